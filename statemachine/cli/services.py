"""Where `imaging server|image` commands keep things (`--store`, `--state`, `--endpoint-url`, else IMAGING_* and the
data directory; DESIGN §6), the services opened there, the embedded workflow running on them, and the errors of the
state, storage and imaging layers as one-line user errors."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click
from pydantic import ValidationError

from functions.imaging.errors import ImagingError
from functions.imaging.services import ImagingServices
from functions.imaging.store_chains import disk_location
from functions.settings import Settings, config_from_environment
from functions.state import InvalidIdError, NotFoundError, StateError, open_state_store
from functions.storage import ObjectStore, StorageError, open_object_store
from statemachine.cli.common import UserError, log_options, require_file

if TYPE_CHECKING:
    from statemachine.local import LocalImaging

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


@contextmanager
def opened(settings: Settings) -> Iterator[ImagingServices]:
    """The store, state and tunables of `settings` (the state closed when the block ends)."""
    try:
        config = config_from_environment()
    except ValueError as error:
        raise UserError(str(error), hint="the IMAGING_* tunables take a whole number of bytes (or seconds)") from error
    store = open_object_store(settings.store_url, endpoint_url=settings.endpoint_url)
    state = open_state_store(settings.state_url, endpoint_url=settings.endpoint_url)
    try:
        disks = (
            open_object_store(settings.disks_url, endpoint_url=settings.endpoint_url) if settings.disks_url else None
        )
        yield ImagingServices(store=store, state=state, config=config, disks=disks)
    finally:
        state.close()


@contextmanager
def embedded_workflow(services: ImagingServices) -> Iterator[LocalImaging]:
    """The imaging workflow on the embedded engine, its handlers using `services` and logging (to stderr) at the
    level and in the format of the global options (`-v`, `--log-format`). The engine is imported here, by the
    commands that run a workflow, and by no other."""
    from statemachine.local import LocalImaging

    options = log_options()
    with LocalImaging(services=services, log_level=options.level, log_format=options.log_format) as workflow:
        yield workflow


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
