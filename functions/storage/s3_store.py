"""Object store on S3 or any S3-compatible service (boto3), with errors mapped to the storage hierarchy.

The client is injected (open_object_store builds one from the standard AWS settings or an explicit endpoint), so
tests hand in clients for moto in-process, a moto server, or one behind a faulty proxy.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from functools import partial
from typing import TYPE_CHECKING, NoReturn, TypeVar

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    IncompleteReadError,
    ReadTimeoutError,
    ResponseStreamingError,
)
from botocore.exceptions import ConnectionError as BotoConnectionError

from functions.storage.checksums import crc32c, decode_crc32c, encode_crc32c, unquote_etag
from functions.storage.errors import (
    ChecksumMismatchError,
    InvalidPartError,
    InvalidRangeError,
    ObjectNotFoundError,
    ObjectPreconditionFailedError,
    StorageError,
    TransientStorageError,
    UploadNotFoundError,
)
from functions.storage.objects import (
    ObjectInfo,
    PartInfo,
    UploadInfo,
    validate_key,
    validate_part_number,
    validate_prefix,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import (
        CompletedPartTypeDef,
        DeleteTypeDef,
        ObjectIdentifierTypeDef,
        PutObjectRequestTypeDef,
    )

_T = TypeVar("_T")
DELETE_BATCH = 1000
"""Most keys S3's DeleteObjects takes in one request."""

_TRANSIENT_CODES = frozenset(
    {
        "InternalError",
        "ServiceUnavailable",
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "RequestLimitExceeded",
        "OperationAborted",
    }
)
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NotFound", "404"})
_PART_CODES = frozenset({"InvalidPart", "InvalidPartOrder", "EntityTooSmall", "EntityTooLarge", "InvalidArgument"})
_CHECKSUM_CODES = frozenset({"BadDigest", "InvalidDigest", "XAmzContentChecksumMismatch", "XAmzContentSHA256Mismatch"})
_NETWORK_ERRORS = (BotoConnectionError, HTTPClientError, ReadTimeoutError, IncompleteReadError, ResponseStreamingError)


def _raise_storage_error(error: Exception, key: str | None) -> NoReturn:
    """Translate a botocore error into the storage hierarchy (transient: network faults, 5xx and throttling)."""
    if isinstance(error, ClientError):
        code = str(error.response.get("Error", {}).get("Code", ""))
        status = int(error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
        message = f"S3 {error.operation_name} failed: {code} {error.response.get('Error', {}).get('Message', '')}"
        if code == "NoSuchUpload":
            raise UploadNotFoundError(message, key=key) from error
        if code == "NoSuchBucket":
            raise ObjectNotFoundError(message, key=key, hint="create the bucket or fix the store URL") from error
        if code in _NOT_FOUND_CODES:
            raise ObjectNotFoundError(message, key=key) from error
        if code == "PreconditionFailed" or status == 412:
            raise ObjectPreconditionFailedError(message, key=key) from error
        if code == "InvalidRange" or status == 416:
            raise InvalidRangeError(message, key=key) from error
        if code in _CHECKSUM_CODES:
            raise ChecksumMismatchError(message, key=key) from error
        if code in _PART_CODES:
            raise InvalidPartError(message, key=key) from error
        if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken"):
            raise StorageError(message, key=key, hint="check the credentials and the bucket policy") from error
        if code in _TRANSIENT_CODES or status >= 500 or status == 429:
            raise TransientStorageError(message, key=key) from error
        raise StorageError(message, key=key) from error
    if isinstance(error, _NETWORK_ERRORS):
        raise TransientStorageError(f"S3 connection failed: {error}", key=key) from error
    raise StorageError(f"S3 request failed: {error}", key=key) from error


class S3ObjectStore:
    """An ObjectStore on `s3://bucket/prefix`; keys are stored as `prefix/key`."""

    def __init__(self, client: S3Client, bucket: str, prefix: str = "") -> None:
        self._client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        if self.prefix:
            validate_key(self.prefix)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def _call(self, key: str | None, operation: Callable[[], _T]) -> _T:
        try:
            return operation()
        except (ClientError, BotoCoreError) as error:
            _raise_storage_error(error, key)

    def _full(self, key: str) -> str:
        validate_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _relative(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    # -- objects ----------------------------------------------------------------------------------------------

    def get_range(self, key: str, start: int, length: int) -> bytes:
        full = self._full(key)
        if start < 0 or length < 0:
            raise InvalidRangeError(f"a range needs start >= 0 and length >= 0, got {start}, {length}", key=key)
        if length == 0:
            return b""
        byte_range = f"bytes={start}-{start + length - 1}"

        def read() -> bytes:
            return self._client.get_object(Bucket=self.bucket, Key=full, Range=byte_range)["Body"].read()

        return self._call(key, read)

    def get(self, key: str) -> bytes:
        full = self._full(key)
        return self._call(key, lambda: self._client.get_object(Bucket=self.bucket, Key=full)["Body"].read())

    def head(self, key: str) -> ObjectInfo:
        full = self._full(key)
        reply = self._call(key, lambda: self._client.head_object(Bucket=self.bucket, Key=full, ChecksumMode="ENABLED"))
        return ObjectInfo(
            key=key,
            size=reply["ContentLength"],
            etag=unquote_etag(reply["ETag"]),
            checksum_crc32c=reply.get("ChecksumCRC32C"),
        )

    def put(self, key: str, data: bytes, *, if_none_match: bool = False, if_match: str | None = None) -> ObjectInfo:
        full = self._full(key)
        checksum = encode_crc32c(crc32c(data))
        request: PutObjectRequestTypeDef = {
            "Bucket": self.bucket,
            "Key": full,
            "Body": data,
            "ChecksumAlgorithm": "CRC32C",
            "ChecksumCRC32C": checksum,
        }
        if if_none_match:
            request["IfNoneMatch"] = "*"
        if if_match is not None:
            request["IfMatch"] = f'"{unquote_etag(if_match)}"'
        try:
            reply = self._call(key, lambda: self._client.put_object(**request))
        except ObjectNotFoundError:
            if if_match is None:
                raise
            raise ObjectPreconditionFailedError("if-match: the object does not exist", key=key) from None
        return ObjectInfo(key=key, size=len(data), etag=unquote_etag(reply["ETag"]), checksum_crc32c=checksum)

    def list_objects(self, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_prefix(prefix)
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        paginator = self._client.get_paginator("list_objects_v2")
        pages = self._call(None, lambda: iter(paginator.paginate(Bucket=self.bucket, Prefix=full_prefix)))
        while True:
            page = self._call(None, lambda: next(pages, None))
            if page is None:
                return
            for item in page.get("Contents", []):
                yield ObjectInfo(key=self._relative(item["Key"]), size=item["Size"], etag=unquote_etag(item["ETag"]))

    def delete(self, key: str) -> None:
        full = self._full(key)
        self._call(key, lambda: self._client.delete_object(Bucket=self.bucket, Key=full))

    def delete_many(self, keys: Sequence[str]) -> None:
        for start in range(0, len(keys), DELETE_BATCH):
            batch = keys[start : start + DELETE_BATCH]
            objects: list[ObjectIdentifierTypeDef] = [{"Key": self._full(key)} for key in batch]
            request: DeleteTypeDef = {"Objects": objects, "Quiet": True}
            reply = self._call(None, partial(self._client.delete_objects, Bucket=self.bucket, Delete=request))
            failed = reply.get("Errors", [])
            if failed:
                first = failed[0]
                raise StorageError(
                    f"{len(failed)} of {len(batch)} objects were not deleted; the first, {first.get('Key')}: "
                    f"{first.get('Code')} {first.get('Message')}",
                    key=first.get("Key"),
                )

    # -- multipart --------------------------------------------------------------------------------------------

    def create_multipart(self, key: str) -> str:
        full = self._full(key)
        reply = self._call(
            key,
            lambda: self._client.create_multipart_upload(Bucket=self.bucket, Key=full, ChecksumAlgorithm="CRC32C"),
        )
        return reply["UploadId"]

    def upload_part(self, key: str, upload_id: str, number: int, data: bytes, crc32c: int) -> PartInfo:
        full = self._full(key)
        validate_part_number(number)
        reply = self._call(
            key,
            lambda: self._client.upload_part(
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                PartNumber=number,
                Body=data,
                ChecksumAlgorithm="CRC32C",
                ChecksumCRC32C=encode_crc32c(crc32c),
            ),
        )
        return PartInfo(number=number, size=len(data), etag=unquote_etag(reply["ETag"]), crc32c=crc32c)

    def upload_part_copy(
        self, key: str, upload_id: str, number: int, source_key: str, start: int, length: int
    ) -> PartInfo:
        full = self._full(key)
        source = self._full(source_key)
        validate_part_number(number)
        if start < 0 or length < 1:
            raise InvalidRangeError(f"a copy range needs start >= 0 and length >= 1, got {start}, {length}", key=key)
        reply = self._call(
            key,
            lambda: self._client.upload_part_copy(
                Bucket=self.bucket,
                Key=full,
                UploadId=upload_id,
                PartNumber=number,
                CopySource={"Bucket": self.bucket, "Key": source},
                CopySourceRange=f"bytes={start}-{start + length - 1}",
            ),
        )
        result = reply["CopyPartResult"]
        checksum = result.get("ChecksumCRC32C")
        return PartInfo(
            number=number,
            size=length,
            etag=unquote_etag(result["ETag"]),
            crc32c=decode_crc32c(checksum) if checksum else None,
        )

    def list_parts(self, key: str, upload_id: str) -> list[PartInfo]:
        full = self._full(key)
        paginator = self._client.get_paginator("list_parts")
        parts: list[PartInfo] = []

        def collect() -> None:
            for page in paginator.paginate(Bucket=self.bucket, Key=full, UploadId=upload_id):
                for item in page.get("Parts", []):
                    checksum = item.get("ChecksumCRC32C")
                    parts.append(
                        PartInfo(
                            number=item["PartNumber"],
                            size=item["Size"],
                            etag=unquote_etag(item["ETag"]),
                            crc32c=decode_crc32c(checksum) if checksum else None,
                        )
                    )

        self._call(key, collect)
        return parts

    def complete_multipart(self, key: str, upload_id: str, parts: Sequence[PartInfo]) -> ObjectInfo:
        full = self._full(key)
        if not parts:
            raise InvalidPartError("a multipart upload needs at least one part to complete", key=key)
        listed: list[CompletedPartTypeDef] = []
        for part in parts:
            entry: CompletedPartTypeDef = {"PartNumber": part.number, "ETag": f'"{unquote_etag(part.etag)}"'}
            if part.crc32c is not None:
                entry["ChecksumCRC32C"] = encode_crc32c(part.crc32c)
            listed.append(entry)
        self._call(
            key,
            lambda: self._client.complete_multipart_upload(
                Bucket=self.bucket, Key=full, UploadId=upload_id, MultipartUpload={"Parts": listed}
            ),
        )
        return self.head(key)

    def abort_multipart(self, key: str, upload_id: str) -> None:
        full = self._full(key)
        self._call(key, lambda: self._client.abort_multipart_upload(Bucket=self.bucket, Key=full, UploadId=upload_id))

    def list_multipart_uploads(self, prefix: str = "") -> list[UploadInfo]:
        validate_prefix(prefix)
        full_prefix = f"{self.prefix}/{prefix}" if self.prefix else prefix
        paginator = self._client.get_paginator("list_multipart_uploads")
        uploads: list[UploadInfo] = []

        def collect() -> None:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=full_prefix):
                uploads.extend(
                    UploadInfo(key=self._relative(item["Key"]), upload_id=item["UploadId"], initiated=item["Initiated"])
                    for item in page.get("Uploads", [])
                )

        self._call(None, collect)
        return sorted(uploads, key=lambda upload: (upload.key.encode(), upload.initiated))
