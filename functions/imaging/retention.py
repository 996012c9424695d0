"""Retention of scheduled images: keep the newest N ACTIVE scheduled images of a server, delete the older ones.

Never touched: on-demand images, images of other servers, and images that are not ACTIVE (being made, or failed).
Part of the imaging domain: Finalize applies it when a scheduled image becomes ACTIVE (catalog depends on imaging,
never the reverse).
"""

from __future__ import annotations

from functions.imaging.images import delete_image
from functions.imaging.services import ImagingServices
from functions.state import Image, ImageOrigin, NotFoundError, Status


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


def apply_retention(services: ImagingServices, server_id: str, keep: int) -> list[str]:
    """Delete the server's scheduled images beyond the newest `keep` ACTIVE ones; returns the deleted ids."""
    expired = expired_images(services.state.list_images(server_id=server_id), server_id, keep)
    return [delete_image(services, image.id).id for image in expired]


def keep_scheduled_images(services: ImagingServices, server_id: str) -> list[str]:
    """Apply the server's schedule's retention (nothing to do once the schedule is gone)."""
    try:
        schedule = services.state.get_schedule(server_id)
    except NotFoundError:
        return []
    return apply_retention(services, server_id, schedule.retention)
