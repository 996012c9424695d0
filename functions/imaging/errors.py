"""The imaging and catalog domain's failures, and the one translation of vhdcore's errors into them.

Every failure is a subclass of `ImagingError` with a stable reason `code` and a `hint` telling an operator what to
do; defining a subclass registers it (`ImagingError.__init_subclass__`), so the failure path knows every one by its
class name. A handler raises one of these; the state machine sees its class name as the Lambda error (for Retry and
Catch), and the Failed state turns that name back into the code and hint stored on the job (`failure_for`).

vhdcore's errors are translated here and nowhere else: `VHD_ERRORS` keys them by their class (one per error kind)
to the domain error they become (`domain_error`, `vhd_errors`) and to the hint for whoever handed us the file
(`vhd_hint`, what the CLI prints). Errors that reach the Failed state from elsewhere (storage, the engine itself)
are mapped by their names in `FOREIGN_FAILURES`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ClassVar, Final

import vhdcore

_REGISTERED: dict[str, type[ImagingError]] = {}


class ImagingError(Exception):
    """Root of the domain's errors; `code` and `hint` are what the job (or the API's answer) records."""

    code: ClassVar[str] = "INTERNAL_ERROR"
    hint: ClassVar[str] = "issue the image again; if it fails the same way, report the job id to the platform team"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if cls.__name__ in _REGISTERED:
            raise TypeError(f"two domain errors are named {cls.__name__}: the failure path knows them by name")
        _REGISTERED[cls.__name__] = cls


def domain_errors() -> dict[str, type[ImagingError]]:
    """Every domain error class by its name, the root included (all are defined in this module)."""
    return {ImagingError.__name__: ImagingError, **_REGISTERED}


# -- requests and servers ------------------------------------------------------------------------------------------


class InvalidRequestError(ImagingError):
    code = "INVALID_REQUEST"
    hint = "name a registered server or an existing leaf disk, with valid ids"


class ServerNotFoundError(ImagingError):
    """No such server for this tenant (another tenant's server is reported the same way: ids do not leak)."""

    code = "NO_SUCH_SERVER"
    hint = "list the servers with `imaging server list` (GET /v1/servers)"


class ServerBusyError(ImagingError):
    code = "SERVER_BUSY"
    hint = "another image of this server is in progress: wait for it to finish"


class ServerBeingImagedError(ServerBusyError):
    """The server's imaging lock is held by another job (`job_id`, when known), as a request for an image finds it."""

    def __init__(self, server_id: str, job_id: str | None) -> None:
        super().__init__(f"server {server_id} is being imaged by job {job_id}")
        self.server_id = server_id
        self.job_id = job_id


class ServerExistsError(ImagingError):
    code = "SERVER_EXISTS"
    hint = "restore into a new server name (`imaging server list` shows the names in use)"


# -- the source disk -----------------------------------------------------------------------------------------------


class CoalesceTimeout(ImagingError):  # noqa: N818 - the name operators and the ASL's Retry/Catch know
    code = "COALESCE_TIMEOUT"
    hint = "the chain could not be merged in time: wait and issue the image again"


class CoalesceInterruptedError(ImagingError):
    """The chain cannot be read: a coalesce of it was interrupted (vhdcore's CoalescePendingError)."""

    code = "COALESCE_PENDING"
    hint = "a coalesce of this chain was interrupted: run `imaging vhd coalesce` on its leaf, then image it again"


class DiskCorruptError(ImagingError):
    code = "DISK_CORRUPT"
    hint = "the server's disk chain is damaged: run `imaging vhd check` on its leaf and repair or restore it"


class DiskMissingError(ImagingError):
    code = "DISK_MISSING"
    hint = "a file of the server's disk chain is missing: check that the chain's files are in place"


class DiskBusyError(ImagingError):
    code = "DISK_BUSY"
    hint = "the disk changed while it was being frozen: limit write activity on the server and image it again"


class DiskExistsError(ImagingError):
    code = "DISK_EXISTS"
    hint = "restore never replaces a file: give --disk a path that does not exist yet"


# -- making the image ----------------------------------------------------------------------------------------------


class FlavorTooSlowError(ImagingError):
    code = "FLAVOR_TOO_SLOW"
    hint = "this flavor's bandwidth cannot image the disk within the job's time limit: move to a newer flavor"


class StorageUnavailableError(ImagingError):
    code = "STORAGE_UNAVAILABLE"
    hint = "the object store failed or refused the image: check the storage service, then image again"


class WorkerCrashed(ImagingError):  # noqa: N818 - the name the ASL retries
    """A compress worker died mid-group; the Map retries it (staged frames are reused)."""

    code = "WORKER_CRASHED"
    hint = "a worker kept crashing: check the workers' memory and time limits, then image again"


class ChunksNotCompressedError(ImagingError):
    """Upload found chunks without a staged frame: a Map item failed (its recorded reason is used if known)."""

    code = "WORKER_FAILED"
    hint = "a compress worker failed: check the job's history for the reason, then image again"


class JobCancelledError(ImagingError):
    """`imaging image cancel` asked the job to stop: raised where its runner next looks (the ASL's Catch then runs
    the failure path)."""

    code = "CANCELLED"
    hint = "the job was cancelled on request: image the server again when an image is wanted"


class JobInterruptedError(ImagingError):
    """The job's runner stopped before the job ended (process killed, server restarted) and it was not resumed."""

    code = "INTERRUPTED"
    hint = (
        "the job's runner stopped before it finished (process killed or restarted): image the server again; "
        "a job resumed by the next `imaging image create` or `imaging serve` keeps what it had stored"
    )


# -- images --------------------------------------------------------------------------------------------------------


class ImageNotFoundError(ImagingError):
    code = "NO_SUCH_IMAGE"
    hint = "list the images with `imaging image list`"


class ImageBusyError(ImagingError):
    code = "IMAGE_BUSY"
    hint = "the image is still being made: wait until it is ACTIVE or ERROR"


class ManifestMissingError(ImagingError):
    code = "MANIFEST_MISSING"
    hint = "the image has no manifest (it never became ACTIVE): delete it and image the server again"


class ImageCorruptError(ImagingError):
    """The stored object does not hold what its manifest says (a frame that fails its CRC32C or does not
    decompress, a wrong length, a content hash that differs)."""

    code = "IMAGE_CORRUPT"
    hint = "run `imaging image verify` on the image for every problem; image the server again to replace it"


class ImageVerificationError(ImageCorruptError):
    """The image just written does not match what was written (the workflow's check before it is ACTIVE)."""

    hint = "the stored image does not match what was written: check the storage service, then image again"


# -- the failure path ----------------------------------------------------------------------------------------------


MAP_FAILURE_NAMES: Final = frozenset({"States.ExceedToleratedFailureThreshold", "ChunksNotCompressedError"})
"""Failures that stand for a Map item's failure, whose own reason the failure path looks up."""


@dataclass(frozen=True)
class Failure:
    code: str
    hint: str

    @classmethod
    def of(cls, error: type[ImagingError]) -> Failure:
        return cls(error.code, error.hint)


@dataclass(frozen=True)
class VhdErrorTranslation:
    """What a vhdcore error (by its class, one per error kind) becomes: the domain error the workflow and the API
    report, and the hint for whoever handed us the file (None: the message says it all)."""

    domain: type[ImagingError]
    hint: str | None


_CHECK_CHAIN = "run `imaging vhd check PATH` to list every problem of the chain"

VHD_ERRORS: Final[dict[type[vhdcore.VhdError], VhdErrorTranslation]] = {
    vhdcore.VhdError: VhdErrorTranslation(DiskCorruptError, None),
    vhdcore.VhdIoError: VhdErrorTranslation(DiskCorruptError, None),
    vhdcore.InvalidArgumentError: VhdErrorTranslation(DiskCorruptError, None),
    vhdcore.VhdFormatError: VhdErrorTranslation(DiskCorruptError, _CHECK_CHAIN),
    vhdcore.ChecksumError: VhdErrorTranslation(DiskCorruptError, _CHECK_CHAIN),
    vhdcore.TruncatedError: VhdErrorTranslation(DiskCorruptError, _CHECK_CHAIN),
    vhdcore.BatError: VhdErrorTranslation(DiskCorruptError, _CHECK_CHAIN),
    vhdcore.UnsupportedError: VhdErrorTranslation(DiskCorruptError, "this VHD uses a feature vhdcore does not support"),
    vhdcore.ChainError: VhdErrorTranslation(DiskCorruptError, None),
    vhdcore.MissingParentError: VhdErrorTranslation(
        DiskMissingError,
        "a child finds its parent by the names recorded in it, relative to the child's folder: "
        "keep the chain's files together and unrenamed",
    ),
    vhdcore.ParentMismatchError: VhdErrorTranslation(
        DiskCorruptError,
        "the parent file is not the disk this child was created on (its UUID differs): it was replaced or re-created",
    ),
    vhdcore.ChainCycleError: VhdErrorTranslation(
        DiskCorruptError, "the chain's parent links loop back; run `imaging vhd check` on the leaf"
    ),
    vhdcore.ChainTooDeepError: VhdErrorTranslation(
        DiskCorruptError, "the chain is deeper than the depth cap; coalesce it to shorten it"
    ),
    vhdcore.CoalescePendingError: VhdErrorTranslation(
        CoalesceInterruptedError,
        "run `imaging vhd coalesce` on the chain's leaf to finish the interrupted coalesce; the content is intact",
    ),
}
"""Every vhdcore error class (a test checks the list against vhdcore's) and what it becomes."""


def vhd_translation(error_class: type[BaseException]) -> VhdErrorTranslation | None:
    """The translation of a vhdcore error class (of its nearest listed base), None for any other class."""
    for cls in error_class.__mro__:
        found = VHD_ERRORS.get(cls)
        if found is not None:
            return found
    return None


def domain_error(error: vhdcore.VhdError) -> ImagingError:
    """The domain error a vhdcore error becomes (raise it `from error`)."""
    translation = vhd_translation(type(error))
    return (translation.domain if translation is not None else DiskCorruptError)(str(error))


def vhd_hint(error: vhdcore.VhdError) -> str | None:
    """The hint for whoever handed us the file that `error` is about, where one helps."""
    translation = vhd_translation(type(error))
    return translation.hint if translation is not None else None


@contextmanager
def vhd_errors(as_error: type[ImagingError] | None = None) -> Iterator[None]:
    """Raise vhdcore's errors in the block as domain errors (`domain_error`), or all as `as_error` when given (e.g.
    a VHD that we wrote ourselves is a corrupt image, whatever vhdcore found wrong with it)."""
    try:
        yield
    except vhdcore.VhdError as error:
        raise (as_error(str(error)) if as_error is not None else domain_error(error)) from error


FOREIGN_FAILURES: Final[dict[str, type[ImagingError]]] = {
    "FileNotFoundError": DiskMissingError,
    "StorageError": StorageUnavailableError,
    "TransientStorageError": StorageUnavailableError,
    "UploadFailedError": StorageUnavailableError,
    "ChecksumMismatchError": StorageUnavailableError,
    "VerificationFailedError": ImageVerificationError,
    "Lambda.Unknown": WorkerCrashed,
    "Runtime.ExitError": WorkerCrashed,
    "States.Timeout": WorkerCrashed,
}
"""Errors raised outside the domain (and not by vhdcore) that reach the Failed state, by their names."""


def failure_for(error_name: str) -> Failure:
    """The code and hint for a failure that the state machine reports under `error_name`: a domain error's, a
    vhdcore error's translation, a foreign error's, else INTERNAL_ERROR."""
    known = domain_errors().get(error_name)
    if known is not None:
        return Failure.of(known)
    vhd_class = getattr(vhdcore, error_name, None)
    if isinstance(vhd_class, type) and issubclass(vhd_class, vhdcore.VhdError):
        translation = vhd_translation(vhd_class)
        if translation is not None:
            return Failure.of(translation.domain)
    return Failure.of(FOREIGN_FAILURES.get(error_name, ImagingError))
