"""The shared xo-chain3 sample: a dynamic base by qemu-io and two differencing layers by Xen Orchestra's vhd-lib
(relative W2ku locators, zero parent timestamps, sector-granular bitmaps)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

import vhdcore
from tests.support import pyvhd
from tests.support.files import sha256_file
from tests.support.model import owners_from_extents
from tests.support.samples import Sample

pytestmark = pytest.mark.native

SECTOR = 512


def test_xo_chain3_flattens_to_the_published_sha256(xo_chain3: Sample, tmp_path: Path) -> None:
    chain = vhdcore.open_chain(str(xo_chain3.leaf))
    assert chain.depth == 3 == xo_chain3.expected["depth"]
    assert chain.virtual_size == xo_chain3.expected["virtual_size"]
    names = [Path(layer.path).name for layer in chain.layers]
    assert names == ["layer2.vhd", "layer1.vhd", "layer0.vhd"]
    assert [layer.disk_type for layer in chain.layers] == ["differencing", "differencing", "dynamic"]
    out = tmp_path / "xo.raw"
    chain.export(str(out), "raw")
    assert sha256_file(out) == xo_chain3.expected["sha256_raw"]
    data = chain.read(0, chain.virtual_size)
    assert hashlib.sha256(data).hexdigest() == xo_chain3.expected["sha256_raw"]


def test_xo_chain3_warns_about_zero_parent_timestamps(xo_chain3: Sample) -> None:
    chain = vhdcore.open_chain(str(xo_chain3.leaf))
    timestamp_warnings = [w for w in chain.warnings if "timestamp" in w.lower()]
    assert timestamp_warnings, f"expected a warning about the zero parent timestamp, got {chain.warnings}"
    assert any("layer2" in w for w in timestamp_warnings) and any("layer1" in w for w in timestamp_warnings)
    assert chain.layers[0].parent_timestamp == 0


def test_xo_chain3_layers_agree_with_the_reference(xo_chain3: Sample) -> None:
    chain = vhdcore.open_chain(str(xo_chain3.leaf))
    ref = pyvhd.PyChain(xo_chain3.leaf)
    for got, want in zip(chain.layers, ref.layers, strict=True):
        assert got.uuid == want.uuid
        assert got.virtual_size == want.virtual_size
        assert got.file_size == want.file_size
        assert got.block_size == want.block_size
        assert got.allocated_blocks == want.allocated_blocks
        assert got.parent_uuid == want.parent_uuid
        assert got.creator_app.strip("\0 ") == want.footer.creator_app.decode().strip("\0 ")
    assert chain.layers[0].parent_name == "layer1.vhd"
    assert chain.layers[1].parent_name == "layer0.vhd"
    # The flattened bytes and the owner of every sector agree with the independent reader.
    assert chain.read(0, chain.virtual_size) == ref.flatten()
    owners = owners_from_extents(chain.map(), chain.virtual_size, chain.depth)
    ref_owners = [None if o is None else chain.depth - 1 - o for o in ref.owners()]
    assert owners == ref_owners


def test_xo_chain3_check_is_clean(xo_chain3: Sample) -> None:
    assert vhdcore.check(str(xo_chain3.leaf)) == []


def test_xo_chain3_export_vhd_matches(xo_chain3: Sample, tmp_path: Path) -> None:
    out = tmp_path / "xo.vhd"
    vhdcore.open_chain(str(xo_chain3.leaf)).export(str(out), "vhd")
    assert hashlib.sha256(pyvhd.flatten(out)).hexdigest() == xo_chain3.expected["sha256_raw"]
    assert (
        hashlib.sha256(vhdcore.open_chain(str(out)).read(0, 64 << 20)).hexdigest() == xo_chain3.expected["sha256_raw"]
    )


def test_xo_chain3_diff_between_its_layers(xo_chain3: Sample) -> None:
    """diff(layer1, layer2) = the sectors whose flattened content changed between the two chains."""
    old = pyvhd.PyChain(xo_chain3.folder / "layer1.vhd").flatten()
    new = pyvhd.PyChain(xo_chain3.leaf).flatten()
    expected: list[tuple[int, int]] = []
    for s in range(len(old) // SECTOR):
        lo = s * SECTOR
        if old[lo : lo + SECTOR] != new[lo : lo + SECTOR]:
            if expected and expected[-1][0] + expected[-1][1] == lo:
                expected[-1] = (expected[-1][0], expected[-1][1] + SECTOR)
            else:
                expected.append((lo, SECTOR))
    d = vhdcore.diff(str(xo_chain3.folder / "layer1.vhd"), str(xo_chain3.leaf))
    assert [tuple(r) for r in d.ranges] == expected
    assert d.total == sum(n for _, n in expected)
    assert d.shared_layers == 2
