"""Chains: ours read back by the reference reader, and chains crafted by the reference writer (odd but valid layouts
and locators) read correctly by vhdcore."""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest

import vhdcore
from tests.support import pyvhd
from tests.support import qemu as q
from tests.support.files import sha256_file
from tests.support.model import owners_from_extents

pytestmark = pytest.mark.native

KiB = 1024
MiB = 1024 * KiB
SECTOR = 512


# --------------------------------------------------------------------------------------------------------------
# Chains written by vhdcore, read by pyvhd
# --------------------------------------------------------------------------------------------------------------


def random_writes(rng: random.Random, size: int, n: int) -> list[tuple[int, bytes]]:
    out = []
    for _ in range(n):
        length = rng.choice([SECTOR, 3 * SECTOR, rng.randrange(1, 5000), rng.randrange(1, 300_000)])
        offset = rng.randrange(0, size - length)
        out.append((offset, rng.randbytes(length)))
    return out


@pytest.mark.parametrize("base_type", ["fixed", "dynamic"])
def test_our_chain_read_by_reference(tmp_path: Path, base_type: str) -> None:
    rng = random.Random(42)
    size = 6 * MiB + 5 * SECTOR
    model = bytearray(size)
    base = tmp_path / "base.vhd"
    vhdcore.create(str(base), size, base_type)  # type: ignore[arg-type]
    leaf = base
    for depth in range(1, 5):
        for off, data in random_writes(rng, size, 8):
            vhdcore.write(str(leaf), off, data)
            model[off : off + len(data)] = data
        child = tmp_path / f"snap{depth}.vhd"
        before = sha256_file(leaf)
        layer = vhdcore.snapshot(str(leaf), str(child))
        assert sha256_file(leaf) == before, "snapshot must not change its parent"
        assert layer.disk_type == "differencing"
        assert layer.virtual_size == size
        assert layer.parent_name == leaf.name
        ref_child = pyvhd.VhdFile(child)
        ref_parent = pyvhd.VhdFile(leaf)
        assert ref_child.disk_type == pyvhd.DISK_DIFFERENCING
        assert ref_child.parent_uuid == ref_parent.uuid == layer.parent_uuid
        assert layer.uuid == ref_child.uuid
        assert ref_child.header is not None
        assert ref_child.header.parent_name == leaf.name, "parent name is UTF-16BE"
        assert ref_child.header.parent_timestamp != 0
        assert layer.parent_timestamp == ref_child.header.parent_timestamp
        codes = {loc.code for loc in ref_child.locators}
        assert codes & {pyvhd.PLATFORM_W2KU, pyvhd.PLATFORM_W2RU, pyvhd.PLATFORM_MACX}, "relative locators written"
        for loc in ref_child.locators:
            assert loc.path is not None and not Path(loc.path).is_absolute(), f"locator {loc.code!r} is not relative"
            assert (child.parent / loc.path).resolve() == leaf.resolve()
        assert ref_child.allocated_blocks == 0
        leaf = child
    for off, data in random_writes(rng, size, 8):
        vhdcore.write(str(leaf), off, data)
        model[off : off + len(data)] = data
    ref = pyvhd.PyChain(leaf)
    assert ref.depth == 5
    assert ref.flatten() == bytes(model)
    chain = vhdcore.open_chain(str(leaf))
    assert chain.warnings == []
    assert chain.read(0, size) == bytes(model)
    owners = owners_from_extents(chain.map(), size, chain.depth)
    assert owners == [None if o is None else chain.depth - 1 - o for o in ref.owners()]
    assert vhdcore.check(str(leaf)) == []


def test_snapshot_in_another_folder_uses_relative_locators(tmp_path: Path) -> None:
    """Parent in base/, child in work/: the child finds its parent through its relative locators, also after the
    whole tree moves."""
    (tmp_path / "base").mkdir()
    (tmp_path / "work").mkdir()
    parent = tmp_path / "base" / "golden.vhd"
    vhdcore.create(str(parent), 3 * MiB)
    vhdcore.write(str(parent), 1000, b"parent" * 100)
    child = tmp_path / "work" / "leaf.vhd"
    vhdcore.snapshot(str(parent), str(child))
    vhdcore.write(str(child), 5000, b"child" * 100)
    expected = bytearray(3 * MiB)
    expected[1000:1600] = b"parent" * 100
    expected[5000:5500] = b"child" * 100
    assert vhdcore.open_chain(str(child)).read(0, 3 * MiB) == bytes(expected)
    assert pyvhd.PyChain(child).flatten() == bytes(expected), "the reference finds the parent via the locators"
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "base", moved / "base")
    shutil.copytree(tmp_path / "work", moved / "work")
    chain = vhdcore.open_chain(str(moved / "work" / "leaf.vhd"))
    assert Path(chain.layers[-1].path).resolve() == (moved / "base" / "golden.vhd").resolve()
    assert chain.read(0, 3 * MiB) == bytes(expected)


def test_snapshot_refuses_existing_child(tmp_path: Path) -> None:
    parent = tmp_path / "p.vhd"
    vhdcore.create(str(parent), MiB)
    child = tmp_path / "c.vhd"
    child.write_bytes(b"precious")
    with pytest.raises(vhdcore.InvalidArgumentError):
        vhdcore.snapshot(str(parent), str(child))
    assert child.read_bytes() == b"precious"


def test_sibling_snapshots_diff(tmp_path: Path) -> None:
    """Two children of one parent: diff compares them by content and shares the parent's layers."""
    base = tmp_path / "base.vhd"
    vhdcore.create(str(base), 4 * MiB, "dynamic", 512 * KiB)
    vhdcore.write(str(base), 0, b"\x01" * 700_000)
    mid = tmp_path / "mid.vhd"
    vhdcore.snapshot(str(base), str(mid))
    vhdcore.write(str(mid), 2 * MiB, b"\x02" * 4096)
    a = tmp_path / "a.vhd"
    b = tmp_path / "b.vhd"
    vhdcore.snapshot(str(mid), str(a))
    vhdcore.snapshot(str(mid), str(b))
    vhdcore.write(str(a), 1024, b"\x03" * 1024)  # sectors 2-3 differ
    vhdcore.write(str(b), 3 * MiB + 100, b"\x04" * 10)  # sector 6144 differs
    vhdcore.write(str(a), 2 * MiB, b"\x02" * 512)  # same bytes as the parent: no difference
    d = vhdcore.diff(str(a), str(b))
    assert [tuple(r) for r in d.ranges] == [(1024, 1024), (3 * MiB, 512)]
    assert d.total == 1536
    assert d.shared_layers == 2


def test_diff_of_unrelated_disks_and_size_mismatch(tmp_path: Path) -> None:
    x = tmp_path / "x.vhd"
    y = tmp_path / "y.vhd"
    vhdcore.create(str(x), 2 * MiB, "fixed")
    vhdcore.create(str(y), 2 * MiB, "dynamic", 512 * KiB)
    vhdcore.write(str(x), 777, b"abc")
    vhdcore.write(str(y), 2 * MiB - 1, b"z")
    d = vhdcore.diff(str(x), str(y))
    assert [tuple(r) for r in d.ranges] == [(512, 512), (2 * MiB - 512, 512)]
    assert d.shared_layers == 0
    z = tmp_path / "z.vhd"
    vhdcore.create(str(z), 3 * MiB)
    with pytest.raises(vhdcore.InvalidArgumentError):
        vhdcore.diff(str(x), str(z))


# --------------------------------------------------------------------------------------------------------------
# Chains crafted by pyvhd, read by vhdcore
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Variant:
    """How to lay out a three-layer chain (base, middle, leaf) with pyvhd."""

    base: str = "dynamic"  # dynamic | fixed
    block_sizes: tuple[int, int, int] = (2 * MiB, 2 * MiB, 2 * MiB)
    order: pyvhd.BlockOrder = "ascending"
    align: int = SECTOR
    gap: int = 0
    legacy: tuple[bool, bool, bool] = (False, False, False)
    base_bitmaps: str = "full"
    unset_fill: int = 0
    # (child folder relative path, parent file relative path) and how the children name their parents
    locators: Callable[[Path, Path], tuple[str, list[pyvhd.LocatorSpec]]] | None = None
    nested: bool = False  # parents in a sub-folder of the leaf's folder
    nested_name: str = "base"
    extra: dict[str, object] = field(default_factory=dict)


def rel(child: Path, parent: Path) -> str:
    return os.path.relpath(parent, child.parent)


def loc_default(child: Path, parent: Path) -> tuple[str, list[pyvhd.LocatorSpec]]:
    r = rel(child, parent)
    return parent.name, [pyvhd.w2ku(r.replace("/", "\\")), pyvhd.w2ru(r.replace("/", "\\"))]


VARIANTS: dict[str, Variant] = {
    "plain": Variant(),
    "out_of_order": Variant(order="shuffled"),
    "descending": Variant(order="descending"),
    "blktap_4k_aligned": Variant(align=4096),
    "not_packed": Variant(gap=7, order="shuffled"),
    "legacy_511_footers": Variant(legacy=(True, True, True)),
    "mixed_block_sizes": Variant(block_sizes=(2 * MiB, 512 * KiB, 1 * MiB)),
    "small_blocks": Variant(block_sizes=(64 * KiB, 64 * KiB, 64 * KiB)),
    "fixed_base": Variant(base="fixed"),
    "fixed_base_legacy": Variant(base="fixed", legacy=(True, False, False)),
    # The differencing layers' unset sectors hold garbage: the bitmap, not the data, decides.
    "garbage_in_unset_sectors": Variant(unset_fill=0xEE),
    # A dynamic base's bitmap is not consulted (qemu's reading): an allocated block is data in full.
    "dynamic_base_exact_bitmaps_with_garbage": Variant(base_bitmaps="exact", unset_fill=0xDD),
    "w2ku_only": Variant(
        nested=True,
        locators=lambda c, p: (p.name, [pyvhd.w2ku(rel(c, p).replace("/", "\\"))]),
    ),
    "w2ku_only_no_name": Variant(nested=True, locators=lambda c, p: ("", [pyvhd.w2ku(rel(c, p))])),
    "w2ru_only_dot_backslash": Variant(
        nested=True,
        locators=lambda c, p: (p.name, [pyvhd.w2ru(".\\" + rel(c, p).replace("/", "\\"))]),
    ),
    "macx_only_relative": Variant(nested=True, locators=lambda c, p: (p.name, [pyvhd.macx("./" + rel(c, p))])),
    "macx_only_absolute_percent_encoded": Variant(
        nested=True, nested_name="base disks", locators=lambda c, p: (p.name, [pyvhd.macx(str(p))])
    ),
    "parent_name_only": Variant(locators=lambda c, p: (p.name, [])),
    "locator_space_in_sectors": Variant(
        nested=True,
        locators=lambda c, p: (p.name, [pyvhd.w2ku(rel(c, p), space_unit="sectors", space_sectors=2)]),
    ),
    "locator_space_in_bytes": Variant(
        nested=True,
        locators=lambda c, p: (p.name, [pyvhd.w2ku(rel(c, p), space_unit="bytes", space_sectors=2)]),
    ),
    "stale_locator_first": Variant(
        nested=True,
        locators=lambda c, p: (p.name, [pyvhd.w2ku("gone\\old.vhd"), pyvhd.macx("./" + rel(c, p))]),
    ),
}


def random_sectors(rng: random.Random, nsect: int, runs: int) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for _ in range(runs):
        start = rng.randrange(nsect)
        for s in range(start, min(nsect, start + rng.choice([1, 1, 2, 7, 64, 300]))):
            out[s] = rng.randbytes(SECTOR)
    return out


def build_variant(folder: Path, v: Variant, seed: int) -> tuple[Path, bytes, list[Path]]:
    """Write base, middle and leaf; return the leaf, the expected flattened disk and the layer paths."""
    rng = random.Random(seed)
    size = 5 * MiB + 3 * SECTOR
    nsect = size // SECTOR
    leaf_dir = folder / "chain"
    parent_dir = leaf_dir / v.nested_name if v.nested else leaf_dir
    parent_dir.mkdir(parents=True, exist_ok=True)
    paths = [parent_dir / "base.vhd", parent_dir / "middle.vhd", leaf_dir / "leaf.vhd"]
    expected = bytearray(size)

    base_sectors = random_sectors(rng, nsect, 12)
    if v.base == "fixed":
        body = bytearray(size)
        for s, d in base_sectors.items():
            body[s * SECTOR : (s + 1) * SECTOR] = d
        pyvhd.write_file(paths[0], pyvhd.build_fixed(size, bytes(body), legacy_footer=v.legacy[0]))
        expected[:] = body
    else:
        spec = pyvhd.DynamicSpec(
            virtual_size=size,
            sectors=base_sectors,
            block_size=v.block_sizes[0],
            block_order=v.order,
            block_align=v.align,
            gap_sectors=v.gap,
            legacy_footer=v.legacy[0],
            bitmap_mode=v.base_bitmaps,  # type: ignore[arg-type]
            unset_fill=v.unset_fill,
            seed=seed,
        )
        pyvhd.write_file(paths[0], pyvhd.build_dynamic(spec)[0])
        bs = v.block_sizes[0]
        for b in {s * SECTOR // bs for s in base_sectors}:  # allocated blocks are data in full
            lo, hi = b * bs, min(size, (b + 1) * bs)
            expected[lo:hi] = bytes([v.unset_fill]) * (hi - lo)
        for s, d in base_sectors.items():
            expected[s * SECTOR : (s + 1) * SECTOR] = d

    for i in (1, 2):
        sectors = random_sectors(rng, nsect, 15)
        make_locators = v.locators or loc_default
        name, locs = make_locators(paths[i], paths[i - 1])
        parent = pyvhd.ParentSpec.of(paths[i - 1], name=name, locators=locs)
        spec = pyvhd.DynamicSpec(
            virtual_size=size,
            sectors=sectors,
            block_size=v.block_sizes[i],
            parent=parent,
            block_order=v.order,
            block_align=v.align,
            gap_sectors=v.gap,
            legacy_footer=v.legacy[i],
            unset_fill=v.unset_fill,
            seed=seed + i,
        )
        pyvhd.write_file(paths[i], pyvhd.build_dynamic(spec)[0])
        for s, d in sectors.items():
            expected[s * SECTOR : (s + 1) * SECTOR] = d
    return paths[2], bytes(expected), paths


@pytest.mark.parametrize("name", list(VARIANTS))
def test_crafted_chain_reads_correctly(tmp_path: Path, name: str) -> None:
    v = VARIANTS[name]
    leaf, expected, paths = build_variant(tmp_path, v, seed=sum(map(ord, name)))
    ref = pyvhd.PyChain(leaf)
    assert ref.flatten() == expected, "the reference reader agrees with the model"
    chain = vhdcore.open_chain(str(leaf))
    assert chain.depth == 3
    assert [Path(x.path).resolve() for x in chain.layers] == [p.resolve() for p in reversed(paths)]
    assert chain.virtual_size == len(expected)
    assert chain.read(0, len(expected)) == expected
    out = tmp_path / "flat.raw"
    chain.export(str(out), "raw")
    assert out.read_bytes() == expected
    owners = owners_from_extents(chain.map(), len(expected), 3)
    assert owners == [None if o is None else 2 - o for o in ref.owners()]
    assert [layer.legacy_footer for layer in reversed(chain.layers)] == list(v.legacy)
    assert vhdcore.check(str(leaf)) == [], "a valid chain has no problems"
    if v.base == "dynamic" and v.base_bitmaps == "exact":
        # qemu reads the base the same way (its bitmap is not consulted for a dynamic disk).
        base_expected = pyvhd.flatten(paths[0])
        assert vhdcore.open_chain(str(paths[0])).read(0, len(expected)) == base_expected
        if q.have_qemu():
            assert q.convert_to_raw(paths[0], tmp_path / "base.raw") == base_expected


def test_stale_parent_timestamp_is_a_warning(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    pyvhd.write_file(base, pyvhd.build_dynamic(pyvhd.DynamicSpec(virtual_size=MiB, timestamp=1000))[0])
    child = tmp_path / "child.vhd"
    parent = pyvhd.ParentSpec.of(base, timestamp=999)
    pyvhd.write_file(child, pyvhd.build_dynamic(pyvhd.DynamicSpec(virtual_size=MiB, parent=parent))[0])
    chain = vhdcore.open_chain(str(child))
    assert chain.depth == 2
    assert any("timestamp" in w.lower() for w in chain.warnings), chain.warnings
    good = tmp_path / "good.vhd"
    pyvhd.write_file(
        good, pyvhd.build_dynamic(pyvhd.DynamicSpec(virtual_size=MiB, parent=pyvhd.ParentSpec.of(base)))[0]
    )
    assert vhdcore.open_chain(str(good)).warnings == []


def test_layer_fields_of_crafted_disks(tmp_path: Path) -> None:
    spec = pyvhd.DynamicSpec(virtual_size=3 * MiB, block_size=512 * KiB, creator_app=b"tap\0", timestamp=123456)
    spec.sectors = {5: b"x" * SECTOR, 2000: b"y" * SECTOR}
    disk = pyvhd.write_file(tmp_path / "d.vhd", pyvhd.build_dynamic(spec)[0])
    layer = vhdcore.open_chain(str(disk)).leaf
    assert layer.disk_type == "dynamic"
    assert layer.virtual_size == 3 * MiB
    assert layer.block_size == 512 * KiB
    assert layer.max_table_entries == 6
    assert layer.allocated_blocks == 2
    assert layer.timestamp == 123456
    assert layer.creator_app.rstrip("\0") == "tap"
    assert layer.uuid == pyvhd.format_uuid(spec.uuid)
    assert layer.parent_uuid is None and layer.parent_name is None
    assert layer.to_dict()["virtual_size"] == 3 * MiB


# --------------------------------------------------------------------------------------------------------------
# vhdcore writing into disks laid out by others
# --------------------------------------------------------------------------------------------------------------

WRITE_INTO = ["plain", "out_of_order", "blktap_4k_aligned", "not_packed", "legacy_511_footers", "mixed_block_sizes"]


@pytest.mark.parametrize("name", WRITE_INTO)
def test_vhdcore_writes_into_crafted_chains(tmp_path: Path, name: str) -> None:
    """Unaligned writes into the leaf of a foreign chain (partial sectors read-modify-written from the layers below),
    then a snapshot on top and more writes: both readers agree with the model afterwards."""
    v = VARIANTS[name]
    leaf, expected, _paths = build_variant(tmp_path, v, seed=len(name))
    model = bytearray(expected)
    rng = random.Random(name)
    for off, data in random_writes(rng, len(model), 12):
        vhdcore.write(str(leaf), off, data)
        model[off : off + len(data)] = data
    assert vhdcore.open_chain(str(leaf)).read(0, len(model)) == bytes(model)
    assert pyvhd.PyChain(leaf).flatten() == bytes(model), "the reference reader reads vhdcore's writes"
    assert vhdcore.check(str(leaf)) == []
    # A new snapshot on top of the foreign leaf, then more writes.
    top = leaf.parent / "top.vhd"
    vhdcore.snapshot(str(leaf), str(top))
    for off, data in random_writes(rng, len(model), 5):
        vhdcore.write(str(top), off, data)
        model[off : off + len(data)] = data
    assert vhdcore.open_chain(str(top)).read(0, len(model)) == bytes(model)
    assert pyvhd.PyChain(top).flatten() == bytes(model)


def test_vhdcore_writes_into_a_qemu_disk(qemu: None, tmp_path: Path) -> None:
    size = 7 * MiB + 3 * SECTOR
    disk = tmp_path / "q.vhd"
    q.create_vpc(disk, size, "dynamic")
    q.io_write_many(disk, "vpc", ["write -q -P 0x31 0 3000", "write -q -P 0x32 4194304 70000"])
    model = bytearray(q.convert_to_raw(disk, tmp_path / "before.raw"))
    rng = random.Random(77)
    for off, data in random_writes(rng, size, 10):
        vhdcore.write(str(disk), off, data)
        model[off : off + len(data)] = data
    assert q.convert_to_raw(disk, tmp_path / "after.raw") == bytes(model)
    assert q.info(disk)["virtual-size"] == size


def test_export_rejects_an_unknown_format(tmp_path: Path) -> None:
    disk = tmp_path / "d.vhd"
    vhdcore.create(str(disk), MiB)
    chain = vhdcore.open_chain(str(disk))
    with pytest.raises(vhdcore.InvalidArgumentError):
        chain.export(str(tmp_path / "out.qcow2"), "qcow2")  # type: ignore[arg-type]
    assert chain.read(MiB, 0) == b""
