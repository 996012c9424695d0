"""Where the workflow keeps things in the object store (DESIGN §4). Ids are validated before they reach a key."""

from __future__ import annotations

from functions.state import validate_id


def staging_prefix(job_id: str) -> str:
    return f"staging/{validate_id('job', job_id)}/"


def plan_key(job_id: str) -> str:
    return f"{staging_prefix(job_id)}plan.json"


def frame_key(job_id: str, index: int) -> str:
    return f"{staging_prefix(job_id)}frames/{index:06d}.zst"


def frame_result_key(job_id: str, index: int) -> str:
    return f"{staging_prefix(job_id)}frames/{index:06d}.json"


def head_key(job_id: str) -> str:
    return f"{staging_prefix(job_id)}head.zst"


def image_key(image_id: str) -> str:
    return f"images/{validate_id('image', image_id)}/image.vhd.zst"


def manifest_key(image_id: str) -> str:
    return f"images/{validate_id('image', image_id)}/manifest.json"


def server_disk_prefix(server_id: str) -> str:
    return f"sr/{validate_id('server', server_id)}/"


def server_disk_key(server_id: str, disk_uuid: str) -> str:
    return f"{server_disk_prefix(server_id)}{validate_id('disk uuid', disk_uuid)}.vhd"
