"""An image written in place resumes after the frames its crashed attempt made durable (issue 14 item 3).

The first Compress attempt writes the first chunks' frames into the image file with vhdcore and records them as
durable, as the real step does every `SYNC_BYTES`, then dies the way a killed worker is reported (WorkerCrashed);
the ASL retries the step, which must compress only the rest. References: the image through `zstd -d` and `qemu-img
convert` against the chain flattened by the independent reader.
"""

from __future__ import annotations

from typing import Any

import pytest

import vhdcore
from functions.handlers import compress
from functions.imaging.layout import StagedFrame, load_written, record_written, spool_key
from functions.imaging.services import ImagingServices
from functions.settings import config_from_environment
from tests.support.pyvhd import flatten
from tests.support.workflow import Env, build_sample_chain, image_raw, request, run

WRITTEN_BEFORE_THE_CRASH = 3


class WorkerCrashed(Exception):  # noqa: N818 - the name the ASL's Retry matches (a worker that died)
    pass


@pytest.fixture(autouse=True)
def _tools(qemu_img: str, zstd_exe: str) -> None:
    """Every test here checks images with the outside tools."""


def test_a_crashed_compress_resumes_after_its_durable_frames(env: Env) -> None:
    leaf = build_sample_chain(env.root / "disks")
    expected = flatten(leaf)
    services = ImagingServices(store=env.store, state=env.state, config=config_from_environment())
    outputs: list[dict[str, Any]] = []
    durable_at_crash: list[StagedFrame] = []
    chunks: list[int] = []

    def crashing_then_real(event: Any, context: Any) -> Any:
        if not outputs and not durable_at_crash:
            job_id = event["job"]["job_id"]
            plan = vhdcore.ImagePlan.from_json(env.store.get(event["plan"]).decode())
            chunks.append(len(plan.chunks))
            assert len(plan.chunks) > WRITTEN_BEFORE_THE_CRASH + 1  # some left to compress after the crash
            batch: list[StagedFrame] = []

            def on_frame(frame: vhdcore.ChunkFrame) -> None:
                assert frame.index is not None and frame.content_sha256 is not None
                batch.append(
                    StagedFrame(
                        index=frame.index,
                        logical_bytes=frame.logical_bytes,
                        content_sha256=frame.content_sha256,
                        crc32c=frame.crc32c,
                        stored_blocks=list(frame.stored_blocks),
                        virtual_bytes=frame.virtual_bytes,
                        read_bytes=frame.read_bytes,
                        compressed_bytes=frame.compressed_bytes,
                        offset=frame.object_offset,
                    )
                )

            def on_durable(end: int) -> None:
                record_written(services, job_id, batch)
                batch.clear()

            vhdcore.open_chain(str(leaf)).compress_chunks_into(
                plan,
                0,
                WRITTEN_BEFORE_THE_CRASH,
                str(env.store.spool_path(spool_key(job_id))),
                plan.head_room,
                level=services.config.level,
                digest="content",
                sync_bytes=1,  # a durable record after every frame
                on_frame=on_frame,
                on_durable=on_durable,
            )
            durable_at_crash.extend(load_written(services, job_id))
            raise WorkerCrashed("the worker died after its durable frames")
        output = compress.handler(event, context)
        outputs.append(output)
        return output

    result = run(request("job-r1", disk=leaf), {"CompressFunctionArn": crashing_then_real})

    assert result.succeeded, (result.error, result.cause)
    assert [frame.index for frame in durable_at_crash] == list(range(WRITTEN_BEFORE_THE_CRASH))
    [retried] = outputs
    assert retried["reused"] == WRITTEN_BEFORE_THE_CRASH
    assert retried["compressed"] == chunks[0] - WRITTEN_BEFORE_THE_CRASH
    assert image_raw(env, "img-job-r1") == expected
    assert list(env.store.list_objects("staging/")) == []
