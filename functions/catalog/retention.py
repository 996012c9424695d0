"""Retention of scheduled images: keep the newest N ACTIVE scheduled images of a server, delete the older ones.

Never touched: on-demand images, images of other servers, and images that are not ACTIVE (being made, or failed).
"""

from __future__ import annotations

from functions.catalog.images import delete_image_data
from functions.state import Image, ImageOrigin, NotFoundError, StateStore, Status
from functions.storage import ObjectStore


def expired_images(images: list[Image], server_id: str, keep: int) -> list[Image]:
    """The images retention would delete, oldest first."""
    if keep < 1:
        raise ValueError(f"retention keeps at least one image, not {keep}")
    scheduled = [
        image
        for image in images
        if image.server_id == server_id and image.origin is ImageOrigin.SCHEDULED and image.status is Status.ACTIVE
    ]
    scheduled.sort(key=lambda image: (image.created_at, image.id), reverse=True)
    return sorted(scheduled[keep:], key=lambda image: (image.created_at, image.id))


def apply_retention(state: StateStore, store: ObjectStore, server_id: str, keep: int) -> list[str]:
    """Delete the server's scheduled images beyond the newest `keep` ACTIVE ones; returns the deleted ids."""
    deleted = []
    for image in expired_images(state.list_images(server_id=server_id), server_id, keep):
        delete_image_data(store, image.id)
        if state.delete_image(image.id):
            deleted.append(image.id)
    return deleted


def keep_scheduled_images(state: StateStore, store: ObjectStore, server_id: str) -> list[str]:
    """Apply the server's schedule's retention (nothing to do once the schedule is gone)."""
    try:
        schedule = state.get_schedule(server_id)
    except NotFoundError:
        return []
    return apply_retention(state, store, server_id, schedule.retention)
