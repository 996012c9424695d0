"""The imaging workflow's failures: each has a stable reason code and a hint telling an operator what to do.

A handler raises one of these; the state machine sees its class name as the Lambda error (for Retry and Catch), and
the Failed state turns that name back into the code and hint stored on the job (`failure_for`). Errors that reach
the Failed state from elsewhere (vhdcore, storage, the engine itself) are mapped by their class names too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Final


class ImagingError(Exception):
    """Root of the workflow's errors; `code` and `hint` are what the job records."""

    code: ClassVar[str] = "INTERNAL_ERROR"
    hint: ClassVar[str] = "issue the image again; if it fails the same way, report the job id to the platform team"


class InvalidRequestError(ImagingError):
    code = "INVALID_REQUEST"
    hint = "name a registered server or an existing leaf disk, with valid ids"


class ServerBusyError(ImagingError):
    code = "SERVER_BUSY"
    hint = "another image of this server is in progress: wait for it to finish"


class CoalesceTimeout(ImagingError):  # noqa: N818 - the name operators and the ASL's Retry/Catch know
    code = "COALESCE_TIMEOUT"
    hint = "the chain could not be merged in time: wait and issue the image again"


class CoalesceUnavailableError(ImagingError):
    code = "COALESCE_UNAVAILABLE"
    hint = "this build of vhdcore has no coalesce_step: install a vhdcore with coalesce, or image with --disk"


class DiskCorruptError(ImagingError):
    code = "DISK_CORRUPT"
    hint = "the server's disk chain is damaged: run `imaging vhd check` on its leaf and repair or restore it"


class DiskMissingError(ImagingError):
    code = "DISK_MISSING"
    hint = "a file of the server's disk chain is missing: check that the chain's files are in place"


class DiskBusyError(ImagingError):
    code = "DISK_BUSY"
    hint = "the disk changed while it was being frozen: limit write activity on the server and image it again"


class FlavorTooSlowError(ImagingError):
    code = "FLAVOR_TOO_SLOW"
    hint = "this flavor's bandwidth cannot image the disk within the job's time limit: move to a newer flavor"


class StorageUnavailableError(ImagingError):
    code = "STORAGE_UNAVAILABLE"
    hint = "the object store failed or refused the image: check the storage service, then image again"


class ImageVerificationError(ImagingError):
    code = "IMAGE_CORRUPT"
    hint = "the stored image does not match what was written: check the storage service, then image again"


class WorkerCrashed(ImagingError):  # noqa: N818 - the name the ASL retries
    """A compress worker died mid-group; the Map retries it (staged frames are reused)."""

    code = "WORKER_CRASHED"
    hint = "a worker kept crashing: check the workers' memory and time limits, then image again"


class ChunksNotCompressedError(ImagingError):
    """Upload found chunks without a staged frame: a Map item failed (its recorded reason is used if known)."""

    code = "WORKER_FAILED"
    hint = "a compress worker failed: check the job's history for the reason, then image again"


MAP_FAILURE_NAMES: Final = frozenset({"States.ExceedToleratedFailureThreshold", "ChunksNotCompressedError"})
"""Failures that stand for a Map item's failure, whose own reason the failure path looks up."""


@dataclass(frozen=True)
class Failure:
    code: str
    hint: str


_IMAGING_ERRORS: Final[tuple[type[ImagingError], ...]] = (
    ImagingError,
    InvalidRequestError,
    ServerBusyError,
    CoalesceTimeout,
    CoalesceUnavailableError,
    DiskCorruptError,
    DiskMissingError,
    DiskBusyError,
    FlavorTooSlowError,
    StorageUnavailableError,
    ImageVerificationError,
    WorkerCrashed,
    ChunksNotCompressedError,
)
_BY_NAME: Final[dict[str, Failure]] = {cls.__name__: Failure(cls.code, cls.hint) for cls in _IMAGING_ERRORS}
# Errors raised outside the imaging domain that still reach the Failed state by their class names.
_FOREIGN: Final[dict[str, type[ImagingError]]] = {
    "MissingParentError": DiskMissingError,
    "FileNotFoundError": DiskMissingError,
    "VhdError": DiskCorruptError,
    "VhdFormatError": DiskCorruptError,
    "ChecksumError": DiskCorruptError,
    "TruncatedError": DiskCorruptError,
    "BatError": DiskCorruptError,
    "UnsupportedError": DiskCorruptError,
    "ChainError": DiskCorruptError,
    "ParentMismatchError": DiskCorruptError,
    "ChainCycleError": DiskCorruptError,
    "ChainTooDeepError": DiskCorruptError,
    "VhdIoError": DiskCorruptError,
    "StorageError": StorageUnavailableError,
    "TransientStorageError": StorageUnavailableError,
    "UploadFailedError": StorageUnavailableError,
    "ChecksumMismatchError": StorageUnavailableError,
    "VerificationFailedError": ImageVerificationError,
    "Lambda.Unknown": WorkerCrashed,
    "Runtime.ExitError": WorkerCrashed,
    "States.Timeout": WorkerCrashed,
}


def failure_for(error_name: str) -> Failure:
    """The code and hint for a failure that the state machine reports under `error_name`."""
    known = _BY_NAME.get(error_name)
    if known is not None:
        return known
    foreign = _FOREIGN.get(error_name, ImagingError)
    return Failure(foreign.code, foreign.hint)
