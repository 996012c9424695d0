"""Object storage by URL (`file:///abs/path`, `s3://bucket/prefix`) and the resumable parallel uploader.

store = open_object_store("s3://images/prod", endpoint_url="http://127.0.0.1:5000")
result = upload_file(store, Path("image.vhd.zst"), "images/42/image.vhd.zst", plan_fixed_parts(size))

The S3 store (boto3, botocore) is imported when an `s3://` URL is opened or `S3ObjectStore` is first used, not with
this package: the file store serves the CLI without them.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote, urlsplit

from functions.storage.errors import (
    ChecksumMismatchError,
    InvalidKeyError,
    InvalidPartError,
    InvalidRangeError,
    InvalidStoreUrlError,
    ObjectNotFoundError,
    ObjectPreconditionFailedError,
    StorageError,
    TransientStorageError,
    UploadFailedError,
    UploadNotFoundError,
    VerificationFailedError,
)
from functions.storage.file_store import FileObjectStore
from functions.storage.objects import ObjectInfo, ObjectStore, PartInfo, UploadInfo, validate_key

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from functions.storage.s3_store import S3ObjectStore


def __getattr__(name: str) -> Any:
    """`S3ObjectStore` on first use (PEP 562): its module imports botocore."""
    if name != "S3ObjectStore":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = importlib.import_module("functions.storage.s3_store").S3ObjectStore
    globals()[name] = value
    return value


S3_MAX_POOL_CONNECTIONS = 32
"""Enough HTTP connections for the uploader's highest concurrency without botocore discarding connections."""


def make_s3_client(endpoint_url: str | None = None) -> S3Client:
    """A boto3 S3 client from the standard AWS settings (credentials, region, AWS_ENDPOINT_URL[_S3]), or an
    explicit endpoint; botocore retries a few times itself ("standard" mode), the uploader retries parts on top."""
    import boto3
    from botocore.config import Config

    config = Config(retries={"mode": "standard", "total_max_attempts": 3}, max_pool_connections=S3_MAX_POOL_CONNECTIONS)
    return boto3.client("s3", endpoint_url=endpoint_url, config=config)


def open_object_store(url: str, *, endpoint_url: str | None = None, s3_client: S3Client | None = None) -> ObjectStore:
    """The object store a URL names: `file:///absolute/dir` or `s3://bucket[/prefix]`.

    For S3, `s3_client` is used when given (tests, or callers that share one), else one is built by make_s3_client.
    """
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost"):
            raise InvalidStoreUrlError(f"a file store URL has no host, got {parts.netloc!r} in {url!r}")
        path = Path(unquote(parts.path))
        if not path.is_absolute() or not parts.path:
            raise InvalidStoreUrlError(f"a file store URL needs an absolute path, got {url!r}")
        return FileObjectStore(path)
    if parts.scheme == "s3":
        if not parts.netloc:
            raise InvalidStoreUrlError(f"an S3 store URL needs a bucket, got {url!r}")
        if parts.query or parts.fragment:
            raise InvalidStoreUrlError(f"an S3 store URL takes no query or fragment, got {url!r}")
        prefix = unquote(parts.path).strip("/")
        if prefix:
            try:
                validate_key(prefix)
            except InvalidKeyError as error:
                raise InvalidStoreUrlError(f"the prefix of {url!r} is not a valid key: {error.args[0]}") from None
        from functions.storage.s3_store import S3ObjectStore

        client = s3_client if s3_client is not None else make_s3_client(endpoint_url)
        return S3ObjectStore(client, parts.netloc, prefix)
    raise InvalidStoreUrlError(f"unsupported store URL {url!r}")


__all__ = [
    "ChecksumMismatchError",
    "FileObjectStore",
    "InvalidKeyError",
    "InvalidPartError",
    "InvalidRangeError",
    "InvalidStoreUrlError",
    "ObjectInfo",
    "ObjectNotFoundError",
    "ObjectPreconditionFailedError",
    "ObjectStore",
    "PartInfo",
    "S3ObjectStore",
    "StorageError",
    "TransientStorageError",
    "UploadFailedError",
    "UploadInfo",
    "UploadNotFoundError",
    "VerificationFailedError",
    "make_s3_client",
    "open_object_store",
]
