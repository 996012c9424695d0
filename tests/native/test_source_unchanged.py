"""Reading never writes: opening, reading, mapping, exporting, diffing and checking a chain leave every layer file
byte-identical (content, size and modification time)."""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest

import vhdcore
from tests.support import pyvhd
from tests.support.files import snapshot_files
from tests.support.samples import Sample

pytestmark = pytest.mark.native

MiB = 1024 * 1024


def exercise(leaf: Path, other: Path, out_dir: Path) -> None:
    chain = vhdcore.open_chain(str(leaf))
    chain.map()
    chain.read(0, min(chain.virtual_size, 3 * MiB))
    chain.export(str(out_dir / "flat.raw"), "raw")
    chain.export(str(out_dir / "flat.vhd"), "vhd")
    vhdcore.check(str(leaf))
    vhdcore.diff(str(other), str(leaf))
    for layer in chain.layers:
        layer.to_dict()


def test_reading_our_chain_changes_nothing(tmp_path: Path) -> None:
    rng = random.Random(9)
    base = tmp_path / "base.vhd"
    vhdcore.create(str(base), 6 * MiB, "dynamic", 512 * 1024)
    vhdcore.write(str(base), 12345, rng.randbytes(900_000))
    mid = tmp_path / "mid.vhd"
    vhdcore.snapshot(str(base), str(mid))
    vhdcore.write(str(mid), 3 * MiB + 1, rng.randbytes(70_000))
    leaf = tmp_path / "leaf.vhd"
    vhdcore.snapshot(str(mid), str(leaf))
    vhdcore.write(str(leaf), 100, rng.randbytes(1000))
    files = [base, mid, leaf]
    before = snapshot_files(files)
    out = tmp_path / "out"
    out.mkdir()
    exercise(leaf, mid, out)
    assert snapshot_files(files) == before


def test_reading_the_xo_sample_changes_nothing(xo_chain3: Sample, tmp_path: Path) -> None:
    files = sorted(xo_chain3.folder.glob("*.vhd"))
    before = snapshot_files(files)
    exercise(xo_chain3.leaf, xo_chain3.folder / "layer1.vhd", tmp_path)
    assert snapshot_files(files) == before


def test_failing_reads_change_nothing(tmp_path: Path) -> None:
    """A chain whose parent has a bad BAT entry: every call fails or reports, and nothing is 'repaired'."""
    base = tmp_path / "base.vhd"
    data, _layout = pyvhd.build_dynamic(
        pyvhd.DynamicSpec(virtual_size=4 * MiB, sectors={0: b"a" * 512, 5000: b"b" * 512})
    )
    base.write_bytes(data)
    leaf = tmp_path / "leaf.vhd"
    spec = pyvhd.DynamicSpec(virtual_size=4 * MiB, parent=pyvhd.ParentSpec.of(base), sectors={9: b"c" * 512})
    leaf.write_bytes(pyvhd.build_dynamic(spec)[0])
    pyvhd.set_bat_entry(base, 1, 0x00FFFFF0)
    before = snapshot_files([base, leaf])
    with pytest.raises(vhdcore.BatError):
        vhdcore.open_chain(str(leaf)).export(str(tmp_path / "x.raw"))
    assert vhdcore.check(str(leaf))
    assert snapshot_files([base, leaf]) == before


def test_read_only_files_can_be_read(tmp_path: Path, xo_chain3: Sample) -> None:
    """Layers without write permission (as shared or frozen layers often are) open and export."""
    folder = tmp_path / "ro"
    shutil.copytree(xo_chain3.folder, folder)
    for f in folder.glob("*.vhd"):
        f.chmod(0o444)
    chain = vhdcore.open_chain(str(folder / "layer2.vhd"))
    chain.export(str(tmp_path / "ro.raw"))
    assert (tmp_path / "ro.raw").stat().st_size == chain.virtual_size
