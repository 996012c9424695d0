"""The storage layer's exceptions: one root, data-carrying subclasses, each with a hint for operators."""

from __future__ import annotations


class StorageError(Exception):
    """Root of every error raised by an object store or the uploader."""

    hint = "check the store URL, the credentials and the store's health"

    def __init__(self, message: str, *, key: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.key = key
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        where = f" (key {self.key!r})" if self.key is not None else ""
        return f"{self.args[0]}{where}; hint: {self.hint}"


class InvalidStoreUrlError(StorageError):
    hint = "use file:///absolute/path or s3://bucket[/prefix]"


class InvalidKeyError(StorageError):
    hint = "keys are relative paths of non-empty segments: no '..', '.', leading '/', backslash or NUL"


class ObjectNotFoundError(StorageError):
    hint = "the object or upload does not exist (deleted, aborted, completed, or never written)"


class UploadNotFoundError(ObjectNotFoundError):
    hint = "the multipart upload is gone (aborted, completed or expired): start a new upload"


class ObjectPreconditionFailedError(StorageError):
    hint = "the object changed or already exists: re-read it and retry the conditional write"


class InvalidRangeError(StorageError):
    hint = "the requested byte range starts past the end of the object"


class InvalidPartError(StorageError):
    """A part number out of 1..10000, a part too small or unknown at completion, or a mismatching ETag."""

    hint = "list the stored parts and complete with exactly those numbers and ETags (5 MiB minimum except the last)"


class ChecksumMismatchError(StorageError):
    hint = "the data changed in transit or at rest: resend the part (the uploader does this itself)"


class TransientStorageError(StorageError):
    """Throttling, 5xx, timeouts and connection resets: retrying the same request may succeed."""

    hint = "the store is busy or the network flaky: retry with backoff"


class UploadFailedError(StorageError):
    """An upload gave up; its multipart upload is left in place so that it can be resumed or aborted."""

    hint = "resume with the same upload id (only missing parts are sent) or abort it to free the staged parts"

    def __init__(self, message: str, *, key: str, upload_id: str | None) -> None:
        super().__init__(message, key=key)
        self.upload_id = upload_id


class VerificationFailedError(StorageError):
    hint = "the completed object does not match the local file: delete it and upload again"


class PartPlanError(StorageError):
    """A part plan that S3 would refuse or that does not cover the file exactly."""

    hint = "parts must be contiguous, 5 MiB..5 GiB (the last may be smaller) and at most 10,000"
