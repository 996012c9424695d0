"""`Chain.usage()` and the live-data options of `Chain.plan`, `Chain.compress` and `Chain.estimate` (DESIGN §5):
an ext4 with deleted files over random bytes, written into a VHD."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
from pathlib import Path

import pytest

import vhdcore

MIB = 1024**2

pytestmark = pytest.mark.skipif(
    shutil.which("mkfs.ext4") is None and not Path("/usr/sbin/mkfs.ext4").exists(), reason="needs e2fsprogs"
)


def tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


@pytest.fixture
def ext4_chain(tmp_path: Path) -> vhdcore.Chain:
    rng = random.Random(1)
    raw = tmp_path / "fs.img"
    raw.write_bytes(rng.randbytes(24 * MIB))
    src = tmp_path / "src"
    src.mkdir()
    for i in range(6):
        (src / f"f{i}").write_bytes(rng.randbytes(2 * MIB))
    subprocess.run([tool("mkfs.ext4"), "-q", "-F", "-E", "nodiscard", "-d", str(src), str(raw)], check=True)
    script = tmp_path / "rm.cmds"
    script.write_text("rm /f1\nrm /f2\nrm /f3\n")
    subprocess.run([tool("debugfs"), "-w", "-f", str(script), str(raw)], check=True, capture_output=True)
    leaf = tmp_path / "d.vhd"
    vhdcore.create(str(leaf), 24 * MIB, "dynamic")
    vhdcore.write(str(leaf), 0, raw.read_bytes())
    return vhdcore.open_chain(str(leaf))


def test_usage_names_the_filesystem_and_its_free_ranges(ext4_chain: vhdcore.Chain) -> None:
    usage = ext4_chain.usage()
    assert (usage.size, usage.table) == (24 * MIB, "none")
    (part,) = usage.partitions
    assert (part.filesystem, part.decision, part.reason) == ("ext4", "dropped", None)
    assert part.free_bytes == usage.free_bytes > 6 * MIB
    assert part.used_bytes + part.free_bytes == part.length
    assert sum(length for _, length in usage.free) == usage.free_bytes
    start, length = usage.free[0]
    assert usage.is_free(start, length) and usage.free_within(0, usage.size) == usage.free_bytes
    assert any(usage.free_blocks(2 * MIB))
    document = json.loads(usage.to_json())
    assert document["partitions"][0]["decision"] == "dropped"


def test_a_live_plan_carries_the_map_and_stores_less(ext4_chain: vhdcore.Chain, tmp_path: Path) -> None:
    usage = ext4_chain.usage()
    every = ext4_chain.plan(8 * MIB)
    live = ext4_chain.plan(8 * MIB, usage=usage)
    assert every.free_bytes == 0 and live.free_bytes == usage.free_bytes
    assert sum(c.read_bytes for c in live.chunks) < sum(c.read_bytes for c in every.chunks)
    assert [c.free for c in vhdcore.ImagePlan.from_json(live.to_json()).chunks] == [c.free for c in live.chunks]
    assert '"free"' not in every.to_json()
    whole = ext4_chain.compress(str(tmp_path / "all.vhd.zst"), chunk_size=8 * MIB)
    stored = ext4_chain.compress(str(tmp_path / "live.vhd.zst"), chunk_size=8 * MIB, usage=usage)
    assert stored.compressed_bytes < whole.compressed_bytes - usage.free_bytes // 2
    estimate = ext4_chain.estimate(chunk_size=8 * MIB, usage=usage)
    assert estimate.low <= stored.compressed_bytes <= estimate.high


def test_a_live_export_zeroes_the_free_ranges(ext4_chain: vhdcore.Chain, tmp_path: Path) -> None:
    usage = ext4_chain.usage()
    ext4_chain.export(str(tmp_path / "all.raw"), "raw")
    ext4_chain.export(str(tmp_path / "live.raw"), "raw", usage=usage)
    expected = bytearray((tmp_path / "all.raw").read_bytes())
    for start, length in usage.free:
        expected[start : start + length] = bytes(length)
    assert (tmp_path / "live.raw").read_bytes() == bytes(expected)
