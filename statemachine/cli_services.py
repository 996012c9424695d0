"""Where `imaging server|image` commands keep things (`--store`, `--state`, `--endpoint-url`, else IMAGING_* and the
data directory; DESIGN §6), and the errors of the state, storage and imaging layers as one-line user errors."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import click
from pydantic import ValidationError

from functions.handlers.runtime import config_from_environment
from functions.imaging.errors import ImagingError
from functions.imaging.services import ImagingServices
from functions.imaging.store_chains import disk_location
from functions.settings import Settings
from functions.state import InvalidIdError, NotFoundError, StateError, open_state_store
from functions.storage import ObjectStore, StorageError, open_object_store
from statemachine.cli_common import UserError, require_file

F = TypeVar("F", bound=Callable[..., Any])


def location_options(func: F) -> F:
    """`--store`, `--state` and `--endpoint-url`, resolved into Settings passed as `settings`."""

    @click.option("--store", metavar="URL", help="Object store: file:///DIR or s3://BUCKET[/PREFIX] [IMAGING_STORE].")
    @click.option("--state", metavar="URL", help="State: sqlite:///FILE or dynamodb://TABLE [IMAGING_STATE].")
    @click.option("--endpoint-url", metavar="URL", help="S3/DynamoDB endpoint (else the standard AWS settings).")
    @functools.wraps(func)
    def wrapper(*args: Any, store: str | None, state: str | None, endpoint_url: str | None, **kwargs: Any) -> Any:
        settings = Settings.resolve(store, state, endpoint_url)
        with user_errors():
            return func(*args, settings=settings, **kwargs)

    return wrapper  # type: ignore[return-value]


def disk_argument(store: ObjectStore, given: str) -> str:
    """A `--disk` argument: a local file (checked; recorded by its absolute path), or a key or URL in the store."""
    local = Path(given).is_absolute() or Path(given).exists()
    if local:
        require_file(given)
    return disk_location(store, given, local_exists=local)


def export_settings(settings: Settings) -> None:
    """Make `settings` what the in-process handlers resolve from the environment."""
    os.environ["IMAGING_STORE"] = settings.store_url
    os.environ["IMAGING_STATE"] = settings.state_url
    if settings.endpoint_url:
        os.environ["AWS_ENDPOINT_URL"] = settings.endpoint_url
    if settings.disks_url:
        os.environ["IMAGING_DISKS"] = settings.disks_url


@contextmanager
def opened(settings: Settings) -> Iterator[ImagingServices]:
    store = open_object_store(settings.store_url, endpoint_url=settings.endpoint_url)
    state = open_state_store(settings.state_url, endpoint_url=settings.endpoint_url)
    try:
        disks = (
            open_object_store(settings.disks_url, endpoint_url=settings.endpoint_url) if settings.disks_url else None
        )
        yield ImagingServices(store=store, state=state, config=config_from_environment(), disks=disks)
    finally:
        state.close()


@contextmanager
def user_errors() -> Iterator[None]:
    """The errors a user can cause, as one `error:` line and a `hint:` (exit code 1)."""
    try:
        yield
    except NotFoundError as error:
        raise UserError(
            str(error), hint="list what exists with `imaging server list` or `imaging image list`"
        ) from error
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise UserError(f"invalid {where}: {first['msg']}", hint="ids are letters, digits, '-' and '_'") from error
    except InvalidIdError as error:
        raise UserError(str(error), hint="ids are letters, digits, '-' and '_' (at most 80)") from error
    except ImagingError as error:
        raise UserError(f"{error.code}: {error}", hint=error.hint) from error
    except StorageError as error:
        raise UserError(str(error.args[0]), hint=error.hint) from error
    except StateError as error:
        raise UserError(str(error), hint="check the state URL (--state / IMAGING_STATE)") from error
