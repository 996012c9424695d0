"""The storage suite runs each test against every backend: files, S3 on moto in-process, S3 on a moto server."""

from __future__ import annotations

import random
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import boto3
import pytest
from botocore.config import Config
from moto import mock_aws
from mypy_boto3_s3 import S3Client

from functions.storage import ObjectStore, open_object_store

BACKENDS = ["file", "s3-inprocess", "s3-server"]


def s3_client(endpoint_url: str | None, *, attempts: int = 3) -> S3Client:
    """A client for moto; `attempts=1` turns botocore's own retries off so the uploader's are exercised."""
    config = Config(retries={"mode": "standard", "total_max_attempts": attempts}, max_pool_connections=32)
    return boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1", config=config)


def new_bucket(client: S3Client) -> str:
    name = f"test-{uuid.uuid4().hex[:20]}"
    client.create_bucket(Bucket=name)
    return name


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def store(backend: str, tmp_path: Path, aws_test_env: None, request: pytest.FixtureRequest) -> Iterator[ObjectStore]:
    """A fresh, empty store of the parametrized backend (a unique bucket and prefix on S3)."""
    if backend == "file":
        yield open_object_store((tmp_path / "store").as_uri())
    elif backend == "s3-inprocess":
        with mock_aws():
            client = s3_client(None)
            yield open_object_store(f"s3://{new_bucket(client)}/some/prefix", s3_client=client)
    else:
        endpoint = request.getfixturevalue("moto_endpoint")
        client = s3_client(endpoint)
        yield open_object_store(f"s3://{new_bucket(client)}/some/prefix", s3_client=client)


@pytest.fixture
def make_file(tmp_path: Path) -> Callable[[int, int], Path]:
    """A local file of `size` seeded random bytes (with some zero runs, like a compressed image with sparse frames)."""

    def make(size: int, seed: int) -> Path:
        rng = random.Random(seed)
        data = bytearray(rng.randbytes(size))
        for _ in range(size // (4 * 1024**2)):
            start = rng.randrange(0, max(1, size - 65536))
            data[start : start + 65536] = bytes(65536)
        path = tmp_path / f"file-{seed}-{size}.bin"
        path.write_bytes(data)
        return path

    return make
