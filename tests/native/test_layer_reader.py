"""Chains opened through a Python reader (`open_chain_from`): the same chain as from files, parents found by the
names their locators give, a failing reader as a VhdIoError naming the layer and offset, snapshots as bytes."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

import vhdcore
from tests.support import pyvhd
from tests.support.samples import Sample

pytestmark = pytest.mark.native

MiB = 1024 * 1024


class DictReader:
    """Layers in memory by name; records the calls, may fail from a given call on."""

    def __init__(self, layers: dict[str, bytes], *, fail_after: int | None = None) -> None:
        self.layers = layers
        self.reads: list[tuple[str, int, int]] = []
        self.fail_after = fail_after

    def size(self, name: str, /) -> int | None:
        data = self.layers.get(name)
        return None if data is None else len(data)

    def read(self, name: str, offset: int, length: int, /) -> bytes:
        if self.fail_after is not None and len(self.reads) >= self.fail_after:
            raise ConnectionError("the store went away")
        self.reads.append((name, offset, length))
        return self.layers[name][offset : offset + length]


def depth3(folder: Path) -> Path:
    rng = random.Random(3)
    base = folder / "base.vhd"
    vhdcore.create(str(base), 24 * MiB)
    vhdcore.write(str(base), 0, rng.randbytes(5 * MiB))
    middle = folder / "middle.vhd"
    vhdcore.snapshot(str(base), str(middle))
    vhdcore.write(str(middle), 3 * MiB + 512, b"middle layer " * 50_000)
    leaf = folder / "leaf.vhd"
    vhdcore.snapshot(str(middle), str(leaf))
    vhdcore.write(str(leaf), 24 * MiB - 1536, b"end" * 500)
    return leaf


def as_store(folder: Path, prefix: str) -> dict[str, bytes]:
    return {f"{prefix}/{path.name}": path.read_bytes() for path in folder.iterdir() if path.suffix == ".vhd"}


def test_a_chain_read_through_a_reader_is_the_chain_of_files(tmp_path: Path) -> None:
    leaf = depth3(tmp_path)
    reader = DictReader(as_store(tmp_path, "sr/web1"))

    chain = vhdcore.open_chain_from(reader, "sr/web1/leaf.vhd")
    files = vhdcore.open_chain(str(leaf))

    assert [layer.path for layer in chain.layers] == ["sr/web1/leaf.vhd", "sr/web1/middle.vhd", "sr/web1/base.vhd"]
    assert [layer.uuid for layer in chain.layers] == [layer.uuid for layer in files.layers]
    assert chain.read(0, chain.virtual_size) == pyvhd.flatten(leaf)
    plan, file_plan = chain.plan(8 * MiB), files.plan(8 * MiB)
    assert [[(r.layer, r.file_offset, r.length) for r in c.reads] for c in plan.chunks] == [
        [(r.layer, r.file_offset, r.length) for r in c.reads] for c in file_plan.chunks
    ]
    assert plan.layer_paths == ["sr/web1/leaf.vhd", "sr/web1/middle.vhd", "sr/web1/base.vhd"]
    estimate = chain.estimate(seed=1)
    assert estimate.compressed_bytes == files.estimate(seed=1).compressed_bytes


def test_a_failing_reader_is_a_vhd_io_error_naming_the_layer_and_offset(tmp_path: Path) -> None:
    depth3(tmp_path)
    layers = as_store(tmp_path, "sr/web1")
    with pytest.raises(vhdcore.VhdIoError) as raised:
        vhdcore.open_chain_from(DictReader(layers, fail_after=4), "sr/web1/leaf.vhd")
    error = raised.value
    assert "ConnectionError" in str(error) and "the store went away" in str(error)
    assert error.path is not None and error.path.startswith("sr/web1/")
    assert error.offset is not None and f"offset {error.offset}" in str(error)

    reader = DictReader(layers)
    chain = vhdcore.open_chain_from(reader, "sr/web1/leaf.vhd")
    reader.fail_after = len(reader.reads)
    with pytest.raises(vhdcore.VhdIoError, match="the store went away"):
        chain.read(0, chain.virtual_size)


def test_a_reader_returning_the_wrong_length_or_type_is_an_error(tmp_path: Path) -> None:
    depth3(tmp_path)
    layers = as_store(tmp_path, "sr/web1")

    class Short(DictReader):
        def read(self, name: str, offset: int, length: int, /) -> bytes:
            return super().read(name, offset, length)[:-1]

    class NotBytes(DictReader):
        def read(self, name: str, offset: int, length: int, /) -> bytes:
            return "text"  # type: ignore[return-value]

    with pytest.raises(vhdcore.VhdIoError, match="returned 511 of 512 bytes"):
        vhdcore.open_chain_from(Short(layers), "sr/web1/leaf.vhd")
    with pytest.raises(vhdcore.VhdIoError, match="read raised"):
        vhdcore.open_chain_from(NotBytes(layers), "sr/web1/leaf.vhd")


def test_missing_and_mismatched_parents(tmp_path: Path) -> None:
    depth3(tmp_path)
    layers = as_store(tmp_path, "sr/web1")
    without_base = {name: data for name, data in layers.items() if not name.endswith("base.vhd")}
    with pytest.raises(vhdcore.MissingParentError, match=r"sr/web1/base\.vhd"):
        vhdcore.open_chain_from(DictReader(without_base), "sr/web1/leaf.vhd")
    other = tmp_path / "other"
    other.mkdir()
    vhdcore.create(str(other / "base.vhd"), 24 * MiB)
    swapped = {**layers, "sr/web1/base.vhd": (other / "base.vhd").read_bytes()}
    with pytest.raises(vhdcore.ParentMismatchError):
        vhdcore.open_chain_from(DictReader(swapped), "sr/web1/leaf.vhd")
    with pytest.raises(vhdcore.VhdIoError, match=r"sr/web1/nope\.vhd"):
        vhdcore.open_chain_from(DictReader(layers), "sr/web1/nope.vhd")
    with pytest.raises(vhdcore.InvalidArgumentError):
        vhdcore.open_chain_from(DictReader(layers), "../leaf.vhd")


def test_snapshot_bytes_is_an_empty_child_in_the_store(tmp_path: Path) -> None:
    leaf = depth3(tmp_path)
    layers = as_store(tmp_path, "sr/web1")
    chain = vhdcore.open_chain_from(DictReader(layers), "sr/web1/leaf.vhd")

    child = chain.snapshot_bytes("./leaf.vhd")
    layers["sr/web1/next.vhd"] = child
    snapped = vhdcore.open_chain_from(DictReader(layers), "sr/web1/next.vhd")

    assert snapped.depth == 4
    assert snapped.layers[0].allocated_blocks == 0
    assert snapped.layers[0].parent_uuid == chain.leaf.uuid
    assert snapped.layers[1].path == "sr/web1/leaf.vhd"
    assert (
        hashlib.sha256(snapped.read(0, snapped.virtual_size)).digest() == hashlib.sha256(pyvhd.flatten(leaf)).digest()
    )
    # The same bytes as a file beside the leaf: qemu-compatible tools and vhdcore's file path read it alike.
    (tmp_path / "next.vhd").write_bytes(child)
    assert vhdcore.open_chain(str(tmp_path / "next.vhd")).layers[1].uuid == chain.leaf.uuid


def test_the_xo_sample_opens_through_a_reader(xo_chain3: Sample) -> None:
    files = vhdcore.open_chain(str(xo_chain3.leaf))
    layers = {f"sr/xo/{Path(layer.path).name}": Path(layer.path).read_bytes() for layer in files.layers}
    chain = vhdcore.open_chain_from(DictReader(layers), f"sr/xo/{xo_chain3.leaf.name}")
    assert [layer.uuid for layer in chain.layers] == [layer.uuid for layer in files.layers]
    assert chain.read(0, chain.virtual_size) == files.read(0, files.virtual_size)
