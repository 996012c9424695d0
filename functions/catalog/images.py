"""Image records as users see them, and deleting an image (object, manifest, record)."""

from __future__ import annotations

from functions.state import Image, StateStore, Status, validate_id
from functions.storage import ObjectStore

TERMINAL = frozenset({Status.ACTIVE, Status.ERROR})


class ImageBusyError(Exception):
    """The image is still being made: it can be deleted once ACTIVE or ERROR."""


def image_keys(image_id: str) -> list[str]:
    """The objects of an image in the store (DESIGN §4)."""
    validate_id("image", image_id)
    return [f"images/{image_id}/image.vhd.zst", f"images/{image_id}/manifest.json"]


def delete_image_data(store: ObjectStore, image_id: str) -> None:
    """Remove the image's objects; already missing ones are fine (deletes are idempotent, as on S3)."""
    for key in image_keys(image_id):
        store.delete(key)


def delete_image(state: StateStore, store: ObjectStore, image: Image) -> None:
    """Delete a finished image: objects first, then the record, so a crash never leaves an orphaned object."""
    if image.status not in TERMINAL:
        raise ImageBusyError(f"image {image.id} is {image.status}: delete it once it is ACTIVE or ERROR")
    delete_image_data(store, image.id)
    state.delete_image(image.id)
