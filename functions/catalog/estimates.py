"""The estimate of an image made now: its compressed size with a low-high range and how long it would take."""

from __future__ import annotations

from pydantic import BaseModel

from functions.imaging.disks import open_disk
from functions.imaging.layout import choose_layout
from functions.imaging.planning import predict_job_of
from functions.imaging.prediction import WARM_FIXED_S
from functions.imaging.progress import flavor_class
from functions.imaging.services import ImagingServices
from functions.state import Server


class ServerEstimate(BaseModel):
    virtual_size: int
    allocated_bytes: int
    estimated_size: int
    estimated_size_low: int
    estimated_size_high: int
    estimated_seconds: float
    flavor_class: str


def estimate_server(services: ImagingServices, server: Server) -> ServerEstimate:
    """Estimate the server's chain as it is now (read-only: nothing is frozen or written), as its image would be
    made: of the live data only unless the server is set to image every block."""
    config = services.config
    chain = open_disk(services.disk_store, server.disk, server.chain)
    usage = None if server.all_blocks else chain.usage()
    estimate = chain.estimate(level=config.level, chunk_size=config.chunk_size, usage=usage)
    layout = choose_layout(services, server.disk)
    timing = predict_job_of(services, estimate, layout, server.flavor, fixed_s=WARM_FIXED_S)
    return ServerEstimate(
        virtual_size=estimate.virtual_size,
        allocated_bytes=estimate.allocated_bytes,
        estimated_size=estimate.compressed_bytes,
        estimated_size_low=estimate.low,
        estimated_size_high=estimate.high,
        estimated_seconds=timing.seconds,
        flavor_class=flavor_class(server.flavor),
    )
