"""Parser models of the handlers' events (the shapes the ASL's Parameters and ItemSelector build)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from functions.state import ImageOrigin


class _Event(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ImageRequest(_Event):
    job_id: str
    image_id: str
    tenant: str = "local"
    name: str = Field(min_length=1, max_length=255)
    server_id: str | None = None
    disk: str | None = None
    origin: ImageOrigin = ImageOrigin.ON_DEMAND
    all_blocks: bool = False


class PrepareEvent(_Event):
    request: ImageRequest


class JobRef(_Event):
    """What Prepare returns, carried at `$.job` through the execution."""

    job_id: str
    image_id: str
    server_id: str | None = None
    coalesce_deadline: datetime
    resumed: bool = False
    """A job run again after its runner died past its snapshot: it goes on from its stored snapshot and plan."""


class JobEvent(_Event):
    job: JobRef


class ChunkGroupItem(_Event):
    first: int = Field(ge=0)
    count: int = Field(ge=1)


class CompressEvent(_Event):
    job: JobRef
    plan: str
    group: ChunkGroupItem


class PlanRef(_Event):
    plan_key: str
    virtual_size: int


class EstimateEvent(_Event):
    job: JobRef
    snapshot: dict[str, Any]


class UploadEvent(_Event):
    job: JobRef
    plan: PlanRef


class FinalizeEvent(UploadEvent):
    upload: dict[str, Any]


class FailureInfo(_Event):
    Error: str = "States.Runtime"
    Cause: str = ""


class FailedState(_Event):
    """The whole execution state when a Catch sent it to Failed: the request, `$.job` if Prepare succeeded, and
    `$.failure`."""

    job: JobRef | None = None
    job_id: str | None = None
    failure: FailureInfo = Field(default_factory=FailureInfo)

    @property
    def failed_job_id(self) -> str | None:
        """The job the execution ran, if it got as far as naming one."""
        return (self.job.job_id if self.job is not None else self.job_id) or None


class FailedEvent(_Event):
    request: FailedState
