"""Acceptance 1: fixed and dynamic disks made and written by qemu flatten through vhdcore exactly as the same writes
applied to a raw file; vhdcore's exported VHD and the disks vhdcore creates read back identically through qemu-img."""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest

import vhdcore
from tests.support import pyvhd
from tests.support import qemu as q
from tests.support.files import supports_sparse_files

pytestmark = [pytest.mark.native, pytest.mark.qemu]

KiB = 1024
MiB = 1024 * KiB
SECTOR = 512
EXPORT_BLOCK = 2 * MiB  # the contract: export(format="vhd") writes 2 MiB blocks

Subformat = Literal["fixed", "dynamic"]


@dataclass(frozen=True)
class Written:
    offset: int
    data: bytes


def plan_writes(rng: random.Random, size: int, count: int) -> list[Written]:
    """Random offsets and lengths: single sectors, unaligned spans, spans over block boundaries, the disk's tail,
    a multi-block span, zeros over data, and repeated patterns."""
    out: list[Written] = []
    for i in range(count):
        shape = i % 7
        if shape == 0:  # one aligned sector
            offset = rng.randrange(size // SECTOR) * SECTOR
            length = SECTOR
        elif shape == 1:  # unaligned start and length
            offset = rng.randrange(size - 1)
            length = rng.randrange(1, min(9000, size - offset) + 1)
        elif shape == 2:  # across a 2 MiB block boundary
            boundary = rng.randrange(1, max(2, size // (2 * MiB))) * 2 * MiB
            boundary = min(boundary, size - SECTOR)
            offset = max(0, boundary - rng.randrange(1, 4000))
            length = min(rng.randrange(1, 8000), size - offset)
        elif shape == 3:  # the last bytes of the disk
            length = rng.randrange(1, 3000)
            offset = size - length
        elif shape == 4:  # a big span over several blocks
            length = min(rng.randrange(2 * MiB, 5 * MiB), size)
            offset = rng.randrange(0, size - length + 1)
        elif shape == 5:  # zeros over what may be data
            offset = rng.randrange(size - 1)
            length = rng.randrange(1, min(70000, size - offset) + 1)
            out.append(Written(offset, bytes(length)))
            continue
        else:  # a sector-aligned multi-sector write
            offset = rng.randrange(size // SECTOR - 8) * SECTOR
            length = rng.randrange(1, 9) * SECTOR
        out.append(Written(offset, rng.randbytes(length)))
    return out


def apply_with_qemu_io(disk: Path, fmt: str, writes: list[Written], scratch: Path) -> None:
    """Write each span with `qemu-io write -s FILE` (zeros with -P 0, exercising the pattern path too)."""
    commands: list[str] = []
    for i, w in enumerate(writes):
        if not any(w.data):
            commands.append(f"write -q -P 0 {w.offset} {len(w.data)}")
            continue
        src = scratch / f"w{i}.bin"
        src.write_bytes(w.data)
        commands.append(f"write -q -s {src} {w.offset} {len(w.data)}")
    q.io_write_many(disk, fmt, commands)


def allocated_export_blocks(vhd: Path) -> set[int]:
    vf = pyvhd.VhdFile(vhd)
    return {i for i, e in enumerate(vf.bat) if e != pyvhd.UNALLOCATED}


def check_export_vhd(chain: vhdcore.Chain, expected: bytes, tmp: Path) -> None:
    out = tmp / "export.vhd"
    stats = chain.export(str(out), "vhd")
    assert stats.format == "vhd"
    assert stats.virtual_size == len(expected)
    info = q.info(out)
    assert info["virtual-size"] == len(expected), "qemu-img must see the exact virtual size of the exported VHD"
    assert q.convert_to_raw(out, tmp / "export.vhd.raw") == expected, "qemu-img reads the exported VHD differently"
    vf = pyvhd.VhdFile(out)
    assert vf.disk_type == pyvhd.DISK_DYNAMIC
    assert vf.block_size == EXPORT_BLOCK
    assert pyvhd.flatten(out) == expected
    allocated = allocated_export_blocks(out)
    for b in range((len(expected) + EXPORT_BLOCK - 1) // EXPORT_BLOCK):
        nonzero = any(expected[b * EXPORT_BLOCK : (b + 1) * EXPORT_BLOCK])
        assert (b in allocated) == nonzero, f"export block {b}: allocated={b in allocated}, has data={nonzero}"


@pytest.mark.parametrize("subformat", ["fixed", "dynamic"])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_qemu_written_disk_flattens_like_raw(qemu: None, tmp_path: Path, subformat: Subformat, seed: int) -> None:
    rng = random.Random(seed * 100 + (subformat == "fixed"))
    size = rng.choice([9 * MiB + 7 * SECTOR, 8 * MiB, 5 * MiB + SECTOR, 12 * MiB - 3 * SECTOR])
    disk = tmp_path / f"{subformat}.vhd"
    raw = tmp_path / "same-writes.raw"
    q.create_vpc(disk, size, subformat)
    raw.write_bytes(bytes(size))
    writes = plan_writes(rng, size, 21)
    apply_with_qemu_io(disk, "vpc", writes, tmp_path)
    apply_with_qemu_io(raw, "raw", writes, tmp_path)
    expected = raw.read_bytes()
    model = bytearray(size)
    for w in writes:
        model[w.offset : w.offset + len(w.data)] = w.data
    assert expected == bytes(model), "qemu-io applied the writes to the raw file as planned"
    assert q.convert_to_raw(disk, tmp_path / "qemu.raw") == expected, "qemu reads its own disk back"

    chain = vhdcore.open_chain(str(disk))
    assert chain.depth == 1
    assert chain.virtual_size == size
    layer = chain.leaf
    assert layer.disk_type == subformat
    assert layer.virtual_size == size
    assert layer.file_size == disk.stat().st_size
    assert layer.creator_app.startswith("qem")
    assert layer.parent_uuid is None
    assert not layer.legacy_footer
    ref = pyvhd.VhdFile(disk)
    assert layer.uuid == ref.uuid
    if subformat == "dynamic":
        assert layer.block_size == ref.block_size
        assert layer.allocated_blocks == ref.allocated_blocks
    else:
        assert layer.block_size is None

    out = tmp_path / "flat.raw"
    progress: list[tuple[int, int]] = []
    stats = chain.export(str(out), "raw", progress=lambda done, total: progress.append((done, total)))
    assert out.read_bytes() == expected, "export raw differs from the same writes applied to a raw file"
    assert stats.format == "raw" and stats.virtual_size == size
    assert progress, "the progress callback is called"
    assert all(t == size for _, t in progress)
    assert [d for d, _ in progress] == sorted(d for d, _ in progress), "progress never goes back"
    assert progress[-1][0] == size

    for _ in range(10):
        off = rng.randrange(size)
        length = rng.randrange(1, min(size - off, 3 * MiB) + 1)
        assert chain.read(off, length) == expected[off : off + length], f"read({off}, {length})"
    check_export_vhd(chain, expected, tmp_path)


@pytest.mark.parametrize("subformat", ["fixed", "dynamic"])
def test_map_of_a_qemu_disk(qemu: None, tmp_path: Path, subformat: Subformat) -> None:
    size = 10 * MiB
    disk = tmp_path / "d.vhd"
    q.create_vpc(disk, size, subformat)
    q.io_write_many(disk, "vpc", ["write -q -P 0x11 4096 512", "write -q -P 0x22 6291456 1000"])
    extents = vhdcore.open_chain(str(disk)).map()
    got = [(e.start, e.length, e.layer) for e in extents]
    if subformat == "fixed":
        assert got == [(0, size, 0)]
    else:
        # qemu allocated blocks 0 and 3 (2 MiB blocks); an allocated block of a dynamic disk is present in full.
        assert got == [(0, 2 * MiB, 0), (2 * MiB, 4 * MiB, None), (6 * MiB, 2 * MiB, 0), (8 * MiB, 2 * MiB, None)]


def test_export_raw_is_sparse(qemu: None, tmp_path: Path) -> None:
    if not supports_sparse_files(tmp_path):
        pytest.skip("this file system does not keep holes")
    size = 64 * MiB
    disk = tmp_path / "mostly-empty.vhd"
    q.create_vpc(disk, size, "dynamic")
    q.io_write_many(disk, "vpc", ["write -q -P 0x5a 33554432 65536"])
    out = tmp_path / "flat.raw"
    vhdcore.open_chain(str(disk)).export(str(out), "raw")
    assert out.stat().st_size == size
    assert out.stat().st_blocks * 512 <= 8 * MiB, "unallocated ranges are holes in the raw export"


SIZES = [
    1 * MiB,
    3_000_000,  # not a multiple of 512: rounded up
    5 * MiB + 3 * SECTOR,
    7 * MiB + 12345,
    16 * MiB,
    33 * MiB - SECTOR,
]


@pytest.mark.parametrize("disk_type", ["fixed", "dynamic"])
@pytest.mark.parametrize("requested", SIZES)
def test_vhdcore_created_disks_read_back_through_qemu(
    qemu: None, tmp_path: Path, disk_type: Subformat, requested: int
) -> None:
    size = (requested + SECTOR - 1) // SECTOR * SECTOR
    disk = tmp_path / "new.vhd"
    layer = vhdcore.create(str(disk), requested, disk_type)
    assert layer.virtual_size == size
    assert layer.disk_type == disk_type
    assert q.info(disk)["virtual-size"] == size, "qemu-img info must show the exact virtual size"
    assert q.convert_to_raw(disk, tmp_path / "empty.raw") == bytes(size)

    rng = random.Random(requested)
    model = bytearray(size)
    for w in plan_writes(rng, size, 14):
        vhdcore.write(str(disk), w.offset, w.data)
        model[w.offset : w.offset + len(w.data)] = w.data
    assert q.info(disk)["virtual-size"] == size
    assert q.convert_to_raw(disk, tmp_path / "written.raw") == bytes(model), "qemu-img reads vhdcore's writes"
    assert pyvhd.flatten(disk) == bytes(model), "the reference reader reads vhdcore's writes"
    # qemu can keep writing into a disk vhdcore made, and vhdcore reads qemu's writes back.
    q.io_write_many(disk, "vpc", ["write -q -P 0x77 0 700"])
    model[0:700] = b"\x77" * 700
    assert vhdcore.open_chain(str(disk)).read(0, size) == bytes(model)


@pytest.mark.parametrize("block_size", [512 * KiB, 1 * MiB, 4 * MiB])
def test_vhdcore_block_sizes_read_back_through_qemu(qemu: None, tmp_path: Path, block_size: int) -> None:
    size = 9 * MiB + 5 * SECTOR
    disk = tmp_path / "bs.vhd"
    layer = vhdcore.create(str(disk), size, "dynamic", block_size)
    assert layer.block_size == block_size
    rng = random.Random(block_size)
    model = bytearray(size)
    for w in plan_writes(rng, size, 10):
        vhdcore.write(str(disk), w.offset, w.data)
        model[w.offset : w.offset + len(w.data)] = w.data
    assert q.info(disk)["virtual-size"] == size
    assert q.convert_to_raw(disk, tmp_path / "bs.raw") == bytes(model)


def test_create_refuses_existing_file(tmp_path: Path) -> None:
    disk = tmp_path / "exists.vhd"
    disk.write_bytes(b"keep me")
    with pytest.raises(vhdcore.InvalidArgumentError):
        vhdcore.create(str(disk), MiB)
    assert disk.read_bytes() == b"keep me"


def test_create_limits(tmp_path: Path) -> None:
    assert vhdcore.MAX_VIRTUAL_SIZE == 2040 * 1024**3
    big = vhdcore.create(str(tmp_path / "max.vhd"), vhdcore.MAX_VIRTUAL_SIZE)
    assert big.virtual_size == vhdcore.MAX_VIRTUAL_SIZE
    with pytest.raises(vhdcore.InvalidArgumentError):
        vhdcore.create(str(tmp_path / "toobig.vhd"), vhdcore.MAX_VIRTUAL_SIZE + SECTOR)
    assert not (tmp_path / "toobig.vhd").exists()


def test_write_and_read_past_the_end(tmp_path: Path) -> None:
    disk = tmp_path / "small.vhd"
    vhdcore.create(str(disk), MiB)
    with pytest.raises(vhdcore.InvalidArgumentError):
        vhdcore.write(str(disk), MiB - 10, b"x" * 11)
    chain = vhdcore.open_chain(str(disk))
    with pytest.raises(vhdcore.InvalidArgumentError):
        chain.read(MiB - 10, 11)
    assert chain.read(MiB - 10, 10) == bytes(10)
