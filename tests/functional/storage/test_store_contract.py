"""The ObjectStore contract, run against every backend (file, S3 on moto in-process, S3 on a moto server)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path

import pytest

from functions.storage import (
    ChecksumMismatchError,
    FileObjectStore,
    InvalidKeyError,
    InvalidPartError,
    InvalidRangeError,
    InvalidStoreUrlError,
    ObjectNotFoundError,
    ObjectPreconditionFailedError,
    ObjectStore,
    S3ObjectStore,
    StorageError,
    UploadNotFoundError,
    open_object_store,
)
from functions.storage.checksums import composite_crc32c, crc32c, encode_crc32c, md5_etag, multipart_etag
from functions.storage.objects import MIN_PART_SIZE


def assert_etag_of(store: ObjectStore, etag: str, data: bytes) -> None:
    """S3 gives a single-part object or a part the hex MD5 of its bytes; the file store's ETags are opaque (CRC32C,
    size and a nonce of the write), which S3's documentation allows: only their shape is common."""
    assert len(etag) == 32 and all(c in "0123456789abcdef" for c in etag), etag
    if isinstance(store, S3ObjectStore):
        assert etag == md5_etag(data)


BAD_KEYS = ["", "/abs/key", "a/../b", "..", "../escape", "a/./b", "a//b", "trailing/", "back\\slash", "nul\x00byte"]


def test_put_get_head_range_list_delete(store: ObjectStore) -> None:
    data = os.urandom(100_000)
    written = store.put("dir/one.bin", data)
    store.put("dir/two.bin", b"second")
    store.put("other.bin", b"third")

    assert_etag_of(store, written.etag, data)
    info = store.head("dir/one.bin")
    assert (info.size, info.etag) == (len(data), written.etag)
    assert info.checksum_crc32c == encode_crc32c(crc32c(data))
    assert store.get("dir/one.bin") == data
    assert store.get_range("dir/one.bin", 10, 1000) == data[10:1010]
    assert store.get_range("dir/one.bin", len(data) - 5, 1000) == data[-5:]
    assert [item.key for item in store.list_objects("dir/")] == ["dir/one.bin", "dir/two.bin"]
    assert [item.key for item in store.list_objects()] == ["dir/one.bin", "dir/two.bin", "other.bin"]
    assert [item.size for item in store.list_objects("dir/t")] == [6]

    store.delete("dir/one.bin")
    store.delete("dir/one.bin")  # deleting an absent key succeeds, as on S3
    with pytest.raises(ObjectNotFoundError):
        store.head("dir/one.bin")
    with pytest.raises(ObjectNotFoundError):
        store.get("dir/one.bin")
    assert [item.key for item in store.list_objects()] == ["dir/two.bin", "other.bin"]


def test_range_past_the_end_is_a_typed_error(store: ObjectStore) -> None:
    store.put("small", b"0123456789")
    with pytest.raises(InvalidRangeError):
        store.get_range("small", 10, 5)
    with pytest.raises(ObjectNotFoundError):
        store.get_range("missing", 0, 5)


@pytest.mark.parametrize("key", BAD_KEYS)
def test_bad_keys_are_rejected_before_any_access(store: ObjectStore, key: str) -> None:
    for operation in (
        lambda: store.put(key, b"x"),
        lambda: store.get(key),
        lambda: store.head(key),
        lambda: store.delete(key),
        lambda: store.get_range(key, 0, 1),
        lambda: store.create_multipart(key),
    ):
        with pytest.raises(InvalidKeyError) as caught:
            operation()
        assert caught.value.hint
    assert list(store.list_objects()) == []


def test_file_store_keeps_keys_inside_its_root(tmp_path: Path) -> None:
    store = open_object_store((tmp_path / "root").as_uri())
    with pytest.raises(InvalidKeyError):
        store.put("../outside", b"x")
    with pytest.raises(InvalidKeyError):
        store.put(".imaging-store/tmp/x", b"x")  # the store's own area
    assert not (tmp_path / "outside").exists()
    store.put("a", b"object")
    with pytest.raises(InvalidKeyError):
        store.put("a/b", b"x")  # a file system cannot hold both "a" and "a/b"


def test_conditional_puts(store: ObjectStore) -> None:
    first = store.put("cond", b"v1", if_none_match=True)
    with pytest.raises(ObjectPreconditionFailedError):
        store.put("cond", b"v2", if_none_match=True)
    with pytest.raises(ObjectPreconditionFailedError):
        store.put("cond", b"v2", if_match=md5_etag(b"something else"))
    second = store.put("cond", b"v2", if_match=first.etag)
    assert store.get("cond") == b"v2"
    assert store.head("cond").etag == second.etag != first.etag
    assert_etag_of(store, second.etag, b"v2")
    with pytest.raises(ObjectPreconditionFailedError):
        store.put("never-written", b"x", if_match=first.etag)


def test_racing_if_none_match_puts_have_one_winner(store: ObjectStore) -> None:
    racers = 8
    barrier = threading.Barrier(racers)
    outcomes: list[str] = []
    lock = threading.Lock()

    def race(index: int) -> None:
        barrier.wait()
        try:
            store.put("lock-object", f"racer {index}".encode(), if_none_match=True)
            outcome = f"won {index}"
        except ObjectPreconditionFailedError:
            outcome = "lost"
        with lock:
            outcomes.append(outcome)

    threads = [threading.Thread(target=race, args=(index,)) for index in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [outcome for outcome in outcomes if outcome.startswith("won")]
    assert len(winners) == 1, outcomes
    assert store.get("lock-object") == f"racer {winners[0].split()[1]}".encode()


def test_multipart_upload_copy_list_and_complete(store: ObjectStore) -> None:
    source = os.urandom(MIN_PART_SIZE + 4096)
    store.put("source", source)
    first = os.urandom(MIN_PART_SIZE)
    last = b"tail bytes"
    upload_id = store.create_multipart("images/x/image")
    assert [(u.key, u.upload_id) for u in store.list_multipart_uploads("images/")] == [("images/x/image", upload_id)]

    part1 = store.upload_part("images/x/image", upload_id, 1, first, crc32c(first))
    part2 = store.upload_part_copy("images/x/image", upload_id, 2, "source", 100, MIN_PART_SIZE)
    part3 = store.upload_part("images/x/image", upload_id, 3, last, crc32c(last))
    listed = store.list_parts("images/x/image", upload_id)
    assert [(p.number, p.size, p.etag) for p in listed] == [
        (1, MIN_PART_SIZE, part1.etag),
        (2, MIN_PART_SIZE, part2.etag),
        (3, len(last), part3.etag),
    ]
    for part, data in ((part1, first), (part2, source[100 : 100 + MIN_PART_SIZE]), (part3, last)):
        assert_etag_of(store, part.etag, data)
    with pytest.raises(ObjectNotFoundError):
        store.head("images/x/image")  # nothing visible before completion

    copied = source[100 : 100 + MIN_PART_SIZE]
    part2_full = type(part2)(part2.number, part2.size, part2.etag, crc32c(copied))
    info = store.complete_multipart("images/x/image", upload_id, [part1, part2_full, part3])
    expected = first + copied + last
    assert store.get("images/x/image") == expected
    head = store.head("images/x/image")
    assert head.size == len(expected) == info.size
    assert head.etag == multipart_etag([part1.etag, part2.etag, part3.etag])
    assert head.checksum_crc32c is not None
    assert head.checksum_crc32c.split("-")[0] == composite_crc32c([crc32c(first), crc32c(copied), crc32c(last)])[:8]
    assert store.list_multipart_uploads() == []
    assert [item.key for item in store.list_objects()] == ["images/x/image", "source"]


def test_a_whole_object_copied_as_a_part_keeps_its_bytes_when_the_source_changes(store: ObjectStore) -> None:
    """The file store links a whole-object copy instead of copying it: the part must still be a snapshot."""
    original = os.urandom(MIN_PART_SIZE)
    store.put("frame-a", original)
    store.put("frame-b", original[:1000])
    upload_id = store.create_multipart("whole")
    part1 = store.upload_part_copy("whole", upload_id, 1, "frame-a", 0, MIN_PART_SIZE)
    part2 = store.upload_part_copy("whole", upload_id, 2, "frame-b", 0, 1000)
    assert (part1.size, part2.size) == (MIN_PART_SIZE, 1000)
    assert part1.crc32c in (None, crc32c(original)) and part2.crc32c in (None, crc32c(original[:1000]))  # moto: None
    store.put("frame-a", b"rewritten after the copy")
    store.delete("frame-b")
    stored = {part.number: part for part in store.list_parts("whole", upload_id)}
    assert (stored[1].etag, stored[2].etag) == (part1.etag, part2.etag)
    store.complete_multipart("whole", upload_id, [part1, part2])
    assert store.get("whole") == original + original[:1000]
    assert store.get("frame-a") == b"rewritten after the copy"
    with pytest.raises(ObjectNotFoundError):
        store.upload_part_copy("whole", store.create_multipart("whole"), 1, "frame-b", 0, 1000)


def test_delete_many_removes_those_keys_and_ignores_absent_ones(store: ObjectStore) -> None:
    keys = [f"staging/job/frames/{index:04d}" for index in range(1205)]  # more than one S3 batch of 1000
    for key in keys[:3] + keys[-3:]:
        store.put(key, key.encode())
    store.put("staging/job/keep", b"kept")
    store.delete_many([*keys, "never-written"])
    assert [info.key for info in store.list_objects("staging/")] == ["staging/job/keep"]
    store.delete_many([])


def test_multipart_rules(store: ObjectStore) -> None:
    upload_id = store.create_multipart("k")
    small = b"s" * 1000
    with pytest.raises(InvalidPartError):
        store.upload_part("k", upload_id, 0, small, crc32c(small))
    with pytest.raises(InvalidPartError):
        store.upload_part("k", upload_id, 10_001, small, crc32c(small))
    one = store.upload_part("k", upload_id, 1, small, crc32c(small))
    two = store.upload_part("k", upload_id, 2, small, crc32c(small))
    with pytest.raises(InvalidPartError):  # every part but the last must be at least 5 MiB
        store.complete_multipart("k", upload_id, [one, two])
    with pytest.raises(InvalidPartError):  # an ETag that is not the stored part's
        store.complete_multipart("k", upload_id, [type(one)(1, one.size, md5_etag(b"other"), one.crc32c)])
    with pytest.raises(ObjectNotFoundError):
        store.head("k")
    with pytest.raises(UploadNotFoundError):
        store.list_parts("k", "0" * 32)


def test_abort_leaves_no_upload_and_no_object(store: ObjectStore) -> None:
    data = os.urandom(MIN_PART_SIZE)
    upload_id = store.create_multipart("aborted")
    store.upload_part("aborted", upload_id, 1, data, crc32c(data))
    store.abort_multipart("aborted", upload_id)
    assert store.list_multipart_uploads() == []
    with pytest.raises(UploadNotFoundError):
        store.list_parts("aborted", upload_id)
    with pytest.raises(UploadNotFoundError):
        store.abort_multipart("aborted", upload_id)
    with pytest.raises(ObjectNotFoundError):
        store.head("aborted")
    assert list(store.list_objects()) == []


def test_file_store_checks_part_checksums(tmp_path: Path) -> None:
    store = FileObjectStore(tmp_path)
    upload_id = store.create_multipart("k")
    with pytest.raises(ChecksumMismatchError):
        store.upload_part("k", upload_id, 1, b"payload", crc32c(b"payload") ^ 1)
    assert store.list_parts("k", upload_id) == []


def test_file_store_area_holds_no_leftovers_after_complete_and_abort(tmp_path: Path) -> None:
    store = FileObjectStore(tmp_path)
    for finish in ("complete", "abort"):
        upload_id = store.create_multipart(finish)
        part = store.upload_part(finish, upload_id, 1, b"data", crc32c(b"data"))
        if finish == "complete":
            store.complete_multipart(finish, upload_id, [part])
        else:
            store.abort_multipart(finish, upload_id)
    area = tmp_path / ".imaging-store"
    assert list((area / "uploads").iterdir()) == []
    assert list((area / "tmp").iterdir()) == []
    assert hashlib.sha256(store.get("complete")).digest() == hashlib.sha256(b"data").digest()


@pytest.mark.parametrize(
    "url",
    ["ftp://host/x", "file://host/abs", "file:relative", "s3://", "s3://bucket/a/../b", "s3://bucket/x?y=1"],
)
def test_bad_store_urls(url: str) -> None:
    with pytest.raises(InvalidStoreUrlError) as caught:
        open_object_store(url)
    assert "file://" in caught.value.hint


def test_s3_url_prefix_is_prepended(aws_test_env: None) -> None:
    from moto import mock_aws

    from .conftest import new_bucket, s3_client

    with mock_aws():
        client = s3_client(None)
        bucket = new_bucket(client)
        store = open_object_store(f"s3://{bucket}/deep/prefix/", s3_client=client)
        assert isinstance(store, S3ObjectStore)
        assert store.url == f"s3://{bucket}/deep/prefix"
        store.put("a/b", b"x")
        raw = client.list_objects_v2(Bucket=bucket)["Contents"]
        assert [item["Key"] for item in raw] == ["deep/prefix/a/b"]
        assert [item.key for item in store.list_objects()] == ["a/b"]


def test_s3_store_built_from_an_endpoint_url_or_the_standard_settings(
    moto_endpoint: str, aws_test_env: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    from .conftest import new_bucket, s3_client

    bucket = new_bucket(s3_client(moto_endpoint))
    explicit = open_object_store(f"s3://{bucket}/p", endpoint_url=moto_endpoint)
    explicit.put("k", b"explicit")
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    from_environment = open_object_store(f"s3://{bucket}/p")
    assert from_environment.get("k") == b"explicit"


def test_file_store_that_cannot_be_created_is_a_typed_error(tmp_path: Path) -> None:
    (tmp_path / "plain-file").write_bytes(b"")
    with pytest.raises(StorageError, match="cannot create the file store"):
        open_object_store((tmp_path / "plain-file" / "store").as_uri())
