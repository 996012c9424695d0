"""The reference implementation (tests/support/pyvhd.py) checked against qemu and the shared sample.

pyvhd is the second opinion for every vhdcore test: it must itself agree with qemu-img on fixed and dynamic disks,
flatten the xo-chain3 sample to its published sha256, and read back what its own writer produced.
"""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from tests.support import pyvhd
from tests.support import qemu as q
from tests.support.samples import Sample

MiB = 1024 * 1024


def test_pyvhd_flattens_xo_chain3(xo_chain3: Sample) -> None:
    chain = pyvhd.PyChain(xo_chain3.leaf)
    assert chain.depth == xo_chain3.expected["depth"]
    assert [layer.path.name for layer in chain.layers] == [c["file"] for c in xo_chain3.expected["chain"]]
    assert chain.virtual_size == xo_chain3.expected["virtual_size"]
    assert hashlib.sha256(chain.flatten()).hexdigest() == xo_chain3.expected["sha256_raw"]
    assert any("timestamp" in w for w in chain.warnings)


@pytest.mark.parametrize("subformat", ["fixed", "dynamic"])
def test_pyvhd_reads_qemu_disks(qemu: None, tmp_path: Path, subformat: str) -> None:
    rng = random.Random(1234)
    size = 6 * MiB + 3 * 512
    disk = tmp_path / "q.vhd"
    q.create_vpc(disk, size, subformat)  # type: ignore[arg-type]
    model = bytearray(size)
    for i in range(12):
        length = rng.choice([512, 1000, 4096, 70_000, rng.randrange(1, 300_000)])
        offset = rng.randrange(0, size - length)
        data = rng.randbytes(length)
        src = tmp_path / f"w{i}.bin"
        src.write_bytes(data)
        q.io_write_file(disk, "vpc", offset, src)
        model[offset : offset + length] = data
    assert q.convert_to_raw(disk, tmp_path / "q.raw") == bytes(model)
    chain = pyvhd.PyChain(disk)
    assert chain.virtual_size == size
    assert chain.flatten() == bytes(model)
    assert chain.read(12345, 7777) == bytes(model[12345 : 12345 + 7777])


@pytest.mark.parametrize(
    ("order", "align", "gap", "bitmaps"),
    [
        ("ascending", 512, 0, "full"),
        ("descending", 512, 3, "exact"),
        ("shuffled", 4096, 0, "full"),
        ("shuffled", 4096, 5, "exact"),
    ],
)
def test_pyvhd_writer_is_read_by_qemu(
    qemu: None, tmp_path: Path, order: pyvhd.BlockOrder, align: int, gap: int, bitmaps: str
) -> None:
    """Dynamic disks laid out in odd ways by pyvhd read the same through qemu-img and pyvhd."""
    rng = random.Random(7)
    size = 5 * MiB
    block = 512 * 1024
    sectors: dict[int, bytes] = {}
    for _ in range(200):
        sectors[rng.randrange(size // 512)] = rng.randbytes(512)
    spec = pyvhd.DynamicSpec(
        virtual_size=size,
        sectors=sectors,
        block_size=block,
        creator_app=b"qem2",  # qemu trusts current_size (not the CHS geometry) for these creators
        block_order=order,
        block_align=align,
        gap_sectors=gap,
        bitmap_mode=bitmaps,  # type: ignore[arg-type]
        seed=3,
    )
    data, layout = pyvhd.build_dynamic(spec)
    disk = pyvhd.write_file(tmp_path / "p.vhd", data)
    expected = bytearray(size)
    for s, payload in sectors.items():
        expected[s * 512 : (s + 1) * 512] = payload
    if align == 4096:
        assert all((off + layout.bitmap_size) % 4096 == 0 for off in layout.block_offsets.values())
    assert q.info(disk)["virtual-size"] == size
    assert q.convert_to_raw(disk, tmp_path / "p.raw") == bytes(expected)
    assert pyvhd.flatten(disk) == bytes(expected)


def test_pyvhd_legacy_footer_fixed(tmp_path: Path) -> None:
    rng = random.Random(5)
    body = rng.randbytes(MiB)
    disk = pyvhd.write_file(tmp_path / "old.vhd", pyvhd.build_fixed(MiB, body, legacy_footer=True))
    assert disk.stat().st_size == MiB + 511
    vf = pyvhd.VhdFile(disk)
    assert vf.footer.legacy
    assert pyvhd.flatten(disk) == body


def test_pyvhd_differencing_roundtrip(tmp_path: Path) -> None:
    """A three-layer chain built by pyvhd (sector-granular bitmaps) reads back as the model."""
    rng = random.Random(11)
    size = 3 * MiB
    model = bytearray(size)
    base_writes = [(rng.randrange(size - 5000), rng.randbytes(5000)) for _ in range(5)]
    for off, d in base_writes:
        model[off : off + len(d)] = d
    base_sectors = pyvhd.sectors_from_writes(base_writes)
    base = tmp_path / "base.vhd"
    base_spec = pyvhd.DynamicSpec(virtual_size=size, sectors=base_sectors, block_size=MiB)
    pyvhd.write_file(base, pyvhd.build_dynamic(base_spec)[0])
    parent = base
    for n in range(2):
        writes = [(rng.randrange(size - 700), rng.randbytes(rng.randrange(1, 700))) for _ in range(20)]
        sectors = pyvhd.sectors_from_writes(writes, base=bytes(model))
        for off, d in writes:
            model[off : off + len(d)] = d
        child = tmp_path / f"child{n}.vhd"
        spec = pyvhd.DynamicSpec(
            virtual_size=size,
            sectors=sectors,
            block_size=MiB,
            parent=pyvhd.ParentSpec.of(parent),
            block_order="descending",
        )
        pyvhd.write_file(child, pyvhd.build_dynamic(spec)[0])
        parent = child
    chain = pyvhd.PyChain(parent)
    assert chain.depth == 3
    assert chain.flatten() == bytes(model)
