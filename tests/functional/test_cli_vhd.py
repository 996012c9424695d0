"""`imaging vhd ...` end to end: the real console script in a subprocess, checked against vhdcore, qemu-img and a
plain model of the disk's bytes."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

import vhdcore

pytestmark = pytest.mark.functional

MIB = 1024 * 1024
GIB = 1024 * MIB

RunImaging = Callable[..., subprocess.CompletedProcess[str]]


@dataclass
class DiskModel:
    """A chain made in a test, with the bytes its flattened disk must hold."""

    virtual_size: int
    layers: list[Path] = field(default_factory=list)  # base first
    data: bytearray = field(default_factory=bytearray)

    @property
    def leaf(self) -> Path:
        return self.layers[-1]

    def apply(self, offset: int, payload: bytes) -> None:
        self.data[offset : offset + len(payload)] = payload


def mixed_writes(seed: int) -> Sequence[tuple[int, bytes]]:
    """Writes of mixed content within the first 8 MiB: text, random, a zero run, and sector-unaligned pieces."""
    rng = random.Random(seed)
    text = b"Cloud Imaging test data: the quick brown fox jumps over the lazy dog.\n" * 3000
    return [
        (0, text[:300_000]),
        (3 * MIB + 123, rng.randbytes(70_001)),
        (5 * MIB - 512, bytes(4096)),
        (7 * MIB + 511, rng.randbytes(513)),
    ]


@pytest.fixture
def chain3(tmp_path: Path) -> DiskModel:
    """A depth-3 chain (dynamic base, two differencing children) built with vhdcore, and its model."""
    folder = tmp_path / "chain3"
    folder.mkdir()
    # 12 MiB in 2 MiB blocks: the writes below touch blocks 0, 1, 2 and 3 only, so the last two stay unallocated.
    model = DiskModel(virtual_size=12 * MIB, data=bytearray(12 * MIB))
    base = folder / "base.vhd"
    vhdcore.create(str(base), model.virtual_size)
    model.layers.append(base)
    for offset, payload in mixed_writes(1):
        vhdcore.write(str(base), offset, payload)
        model.apply(offset, payload)
    for depth, seed in ((1, 2), (2, 3)):
        child = folder / f"layer{depth}.vhd"
        vhdcore.snapshot(str(model.leaf), str(child))
        model.layers.append(child)
        for offset, payload in mixed_writes(seed)[1:]:
            shifted = offset + depth * 4096 + 17
            vhdcore.write(str(child), shifted, payload)
            model.apply(shifted, payload)
    return model


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)


def assert_user_error(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit code 1, an `error:` line (plus at most one `hint:` line) on stderr, and no traceback."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert 1 <= len(lines) <= 2, result.stderr
    assert lines[0].startswith("error: "), result.stderr
    if len(lines) == 2:
        assert lines[1].startswith("hint: "), result.stderr
    for needle in needles:
        assert needle in lines[0], result.stderr
    return lines[0]


def assert_usage_error(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    assert "Usage:" in result.stderr or "Error:" in result.stderr


def qemu_info(qemu_img: str, path: Path) -> dict[str, Any]:
    out = subprocess.run(
        [qemu_img, "info", "-f", "vpc", "--output", "json", str(path)], check=True, capture_output=True
    )
    info: dict[str, Any] = json.loads(out.stdout)
    return info


def qemu_to_raw(qemu_img: str, src: Path, dst: Path) -> bytes:
    subprocess.run([qemu_img, "convert", "-f", "vpc", "-O", "raw", str(src), str(dst)], check=True)
    return dst.read_bytes()


def layer_dicts(path: Path) -> list[dict[str, Any]]:
    return [layer.to_dict() for layer in vhdcore.open_chain(str(path)).layers]


# --- create ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size_arg", "expected"),
    [("10G", 10 * GIB), ("512M", 512 * MIB), ("1048576", MIB), ("1.5G", 3 * GIB // 2), ("1000000", 1_000_448)],
)
def test_create_dynamic_reads_back_through_qemu(
    run_imaging: RunImaging, tmp_path: Path, qemu_img: str, size_arg: str, expected: int
) -> None:
    disk = tmp_path / "disk.vhd"
    created = ok_json(run_imaging("vhd", "create", disk, size_arg, "--json"))
    assert created["virtual_size"] == expected
    assert created["disk_type"] == "dynamic"
    assert created == vhdcore.open_chain(str(disk)).leaf.to_dict()
    info = qemu_info(qemu_img, disk)
    assert info["format"] == "vpc"
    assert info["virtual-size"] == expected


def test_create_fixed_and_block_size(run_imaging: RunImaging, tmp_path: Path, qemu_img: str) -> None:
    fixed = tmp_path / "fixed.vhd"
    result = run_imaging("vhd", "create", fixed, "3M", "--type", "fixed")
    assert result.returncode == 0, result.stderr
    assert "fixed" in result.stdout and "3 MiB (3145728 bytes)" in result.stdout
    assert qemu_info(qemu_img, fixed)["virtual-size"] == 3 * MIB
    assert vhdcore.open_chain(str(fixed)).leaf.disk_type == "fixed"

    small_blocks = tmp_path / "small-blocks.vhd"
    created = ok_json(run_imaging("vhd", "create", small_blocks, "4M", "--block-size", "512K", "--json"))
    assert created["block_size"] == 512 * 1024
    assert vhdcore.open_chain(str(small_blocks)).leaf.block_size == 512 * 1024
    assert qemu_info(qemu_img, small_blocks)["virtual-size"] == 4 * MIB


def test_create_refuses_to_overwrite(run_imaging: RunImaging, tmp_path: Path) -> None:
    disk = tmp_path / "disk.vhd"
    disk.write_bytes(b"precious")
    assert_user_error(run_imaging("vhd", "create", disk, "1M"), "already exists")
    assert disk.read_bytes() == b"precious"


def test_create_too_large_is_a_bad_input(run_imaging: RunImaging, tmp_path: Path) -> None:
    assert_user_error(run_imaging("vhd", "create", tmp_path / "huge.vhd", "3T"))
    assert not (tmp_path / "huge.vhd").exists()


@pytest.mark.parametrize(
    "args",
    [
        ["vhd", "create", "x.vhd"],  # missing SIZE
        ["vhd", "create", "x.vhd", "10X"],  # not a size
        ["vhd", "create", "x.vhd", "1.3"],  # not a whole number of bytes
        ["vhd", "create", "x.vhd", "1M", "--type", "sparse"],
        ["vhd", "create", "x.vhd", "1M", "--type", "fixed", "--block-size", "1M"],
        ["vhd", "export", "a.vhd", "out", "--format", "qcow2"],
        ["vhd", "info"],
        ["vhd", "info", "a.vhd", "--bogus"],
        ["vhd", "frobnicate"],
        ["nothing-like-this"],
        ["vhd", "write", "a.vhd", "minus-one", "-"],
    ],
)
def test_usage_errors_exit_2(run_imaging: RunImaging, args: list[str]) -> None:
    assert_usage_error(run_imaging(*args))


# --- snapshot, write, info ----------------------------------------------------------------------------------------


def build_chain_with_cli(run_imaging: RunImaging, folder: Path) -> DiskModel:
    """A depth-3 chain made only through the command line: create, snapshot, write (file and stdin)."""
    folder.mkdir()
    model = DiskModel(virtual_size=8 * MIB, data=bytearray(8 * MIB))
    base = folder / "base.vhd"
    assert run_imaging("vhd", "create", base, "8M").returncode == 0
    model.layers.append(base)
    writes = [
        (0, b"text " * 20_000),
        (2 * MIB - 100, bytes(range(256)) * 9),
        (6 * MIB + 1, hashlib.sha256(b"x").digest() * 1000),
    ]
    for depth in range(3):
        if depth:
            child = folder / f"layer{depth}.vhd"
            made = ok_json(run_imaging("vhd", "snapshot", model.leaf, child, "--json"))
            assert made["disk_type"] == "differencing"
            model.layers.append(child)
        offset, payload = writes[depth]
        payload = payload[::-1] if depth == 2 else payload
        src = folder / f"payload{depth}.bin"
        src.write_bytes(payload)
        if depth == 1:
            result = run_imaging("vhd", "write", model.leaf, str(offset), "-", "--json", input=payload)
        else:
            result = run_imaging("vhd", "write", model.leaf, str(offset), src, "--json")
        assert ok_json(result) == {"path": str(model.leaf), "offset": offset, "bytes": len(payload)}
        model.apply(offset, payload)
    return model


@pytest.fixture
def cli_chain(run_imaging: RunImaging, tmp_path: Path) -> DiskModel:
    return build_chain_with_cli(run_imaging, tmp_path / "cli-chain")


def test_info_json_agrees_with_vhdcore(run_imaging: RunImaging, cli_chain: DiskModel) -> None:
    info = ok_json(run_imaging("vhd", "info", cli_chain.leaf, "--json"))
    chain = vhdcore.open_chain(str(cli_chain.leaf))
    leaf = chain.leaf
    assert info["type"] == "differencing"
    assert info["virtual_size"] == cli_chain.virtual_size == chain.virtual_size
    assert info["file_size"] == leaf.file_size == cli_chain.leaf.stat().st_size
    assert info["block_size"] == leaf.block_size
    assert info["allocated_blocks"] == leaf.allocated_blocks
    assert info["uuid"] == leaf.uuid
    assert info["depth"] == 3
    assert info["chain"] == layer_dicts(cli_chain.leaf)
    assert [Path(layer["path"]).name for layer in info["chain"]] == ["layer2.vhd", "layer1.vhd", "base.vhd"]
    assert info["parent"]["uuid"] == chain.layers[1].uuid
    assert Path(info["parent"]["path"]).name == "layer1.vhd"
    assert info["warnings"] == chain.warnings

    base_info = ok_json(run_imaging("vhd", "info", cli_chain.layers[0], "--json"))
    assert base_info["parent"] is None and base_info["depth"] == 1 and base_info["type"] == "dynamic"


def test_info_human_output(run_imaging: RunImaging, cli_chain: DiskModel) -> None:
    result = run_imaging("vhd", "info", cli_chain.leaf)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "differencing" in out
    assert "8 MiB (8388608 bytes)" in out
    chain = vhdcore.open_chain(str(cli_chain.leaf))
    for layer in chain.layers:
        assert layer.uuid in out
        assert layer.path in out
    assert "3 layers" in out


def test_snapshot_refuses_existing_child(run_imaging: RunImaging, cli_chain: DiskModel) -> None:
    before = cli_chain.layers[1].read_bytes()
    assert_user_error(run_imaging("vhd", "snapshot", cli_chain.leaf, cli_chain.layers[1]), "is a layer of the chain")
    assert cli_chain.layers[1].read_bytes() == before


# --- map, diff ----------------------------------------------------------------------------------------------------


def test_map_json_agrees_with_vhdcore_and_model(run_imaging: RunImaging, chain3: DiskModel) -> None:
    mapped = ok_json(run_imaging("vhd", "map", chain3.leaf, "--json"))
    chain = vhdcore.open_chain(str(chain3.leaf))
    expected = [(e.start, e.length, e.layer) for e in chain.map()]
    assert [(e["start"], e["length"], e["layer"]) for e in mapped["extents"]] == expected
    assert mapped["virtual_size"] == chain3.virtual_size
    assert mapped["layers"] == [layer.path for layer in chain.layers]
    for extent in mapped["extents"]:
        assert extent["path"] == (None if extent["layer"] is None else mapped["layers"][extent["layer"]])
    # Extents tile the disk; "zero" extents hold only zeros in the model.
    position = 0
    for extent in mapped["extents"]:
        assert extent["start"] == position
        position += extent["length"]
        if extent["layer"] is None:
            assert not any(chain3.data[extent["start"] : extent["start"] + extent["length"]])
    assert position == chain3.virtual_size


def test_map_human_output(run_imaging: RunImaging, chain3: DiskModel) -> None:
    result = run_imaging("vhd", "map", chain3.leaf)
    assert result.returncode == 0, result.stderr
    assert "zero" in result.stdout
    assert "layer2.vhd" in result.stdout and "base.vhd" in result.stdout
    assert f"{len(vhdcore.open_chain(str(chain3.leaf)).map())} extents" in result.stdout


def test_diff_json_agrees_with_vhdcore_and_model(run_imaging: RunImaging, chain3: DiskModel) -> None:
    base, leaf = chain3.layers[0], chain3.leaf
    differ = run_imaging("vhd", "diff", base, leaf, "--json")
    assert differ.returncode == 1, differ.stderr  # they differ (as `qemu-img compare`)
    result = json.loads(differ.stdout)
    expected = vhdcore.diff(str(base), str(leaf))
    assert [(r["start"], r["length"]) for r in result["ranges"]] == expected.ranges
    assert result["total"] == expected.total == sum(r["length"] for r in result["ranges"])
    assert result["shared_layers"] == expected.shared_layers

    old = vhdcore.open_chain(str(base)).read(0, chain3.virtual_size)
    new = bytes(chain3.data)
    covered = bytearray(chain3.virtual_size // 512)
    for r in result["ranges"]:
        assert r["start"] % 512 == 0 and r["length"] % 512 == 0
        for sector in range(r["start"] // 512, (r["start"] + r["length"]) // 512):
            covered[sector] = 1
    for sector in range(chain3.virtual_size // 512):
        lo, hi = sector * 512, sector * 512 + 512
        assert bool(covered[sector]) == (old[lo:hi] != new[lo:hi]), f"sector {sector}"


def test_diff_identical_and_human(run_imaging: RunImaging, chain3: DiskModel) -> None:
    same = ok_json(run_imaging("vhd", "diff", chain3.leaf, chain3.leaf, "--json"))
    assert same["ranges"] == [] and same["total"] == 0
    assert run_imaging("vhd", "diff", chain3.leaf, chain3.leaf).returncode == 0
    human = run_imaging("vhd", "diff", chain3.layers[0], chain3.leaf)
    assert human.returncode == 1, human.stderr  # they differ
    assert "Traceback" not in human.stderr
    assert "total:" in human.stdout and "bytes)" in human.stdout


def test_diff_of_different_sizes_is_a_bad_input(run_imaging: RunImaging, tmp_path: Path, chain3: DiskModel) -> None:
    other = tmp_path / "other.vhd"
    vhdcore.create(str(other), 4 * MIB)
    assert_user_error(run_imaging("vhd", "diff", chain3.leaf, other))


# --- export -------------------------------------------------------------------------------------------------------


def test_export_raw_and_vhd(run_imaging: RunImaging, tmp_path: Path, qemu_img: str, cli_chain: DiskModel) -> None:
    raw = tmp_path / "flat.raw"
    stats = ok_json(run_imaging("vhd", "export", cli_chain.leaf, raw, "--format", "raw", "--json"))
    assert raw.read_bytes() == cli_chain.data
    assert stats["format"] == "raw"
    assert stats["virtual_size"] == cli_chain.virtual_size
    assert stats["data_bytes"] + stats["zero_bytes"] == cli_chain.virtual_size
    assert stats["depth"] == 3

    out_vhd = tmp_path / "flat.vhd"
    stats = ok_json(run_imaging("vhd", "export", cli_chain.leaf, out_vhd, "--format", "vhd", "--json"))
    assert stats["format"] == "vhd"
    assert stats["bytes_written"] == out_vhd.stat().st_size
    assert qemu_to_raw(qemu_img, out_vhd, tmp_path / "via-qemu.raw") == cli_chain.data
    flat = vhdcore.open_chain(str(out_vhd))
    assert flat.depth == 1 and flat.leaf.disk_type == "dynamic"


def test_export_compressed_image(
    run_imaging: RunImaging, tmp_path: Path, qemu_img: str, zstd_exe: str, cli_chain: DiskModel
) -> None:
    image = tmp_path / "image.vhd.zst"
    stats = ok_json(
        run_imaging("vhd", "export", cli_chain.leaf, image, "--format", "vhd.zst", "--chunk-size", "4M", "--json")
    )
    assert stats["compressed_bytes"] == image.stat().st_size
    assert stats["virtual_size"] == cli_chain.virtual_size
    assert len(stats["chunks"]) == 1 + -(-cli_chain.virtual_size // (4 * 1024 * 1024))
    vhd = tmp_path / "image.vhd"
    subprocess.run([zstd_exe, "-q", "-d", str(image), "-o", str(vhd)], check=True)
    assert vhd.stat().st_size == stats["image_bytes"]
    assert qemu_to_raw(qemu_img, vhd, tmp_path / "via-qemu.raw") == cli_chain.data
    human = run_imaging("vhd", "export", cli_chain.leaf, tmp_path / "again.zst", "--format", "vhd.zst", "--level", "1")
    assert human.returncode == 0 and "zstd level 1" in human.stdout


def unpack_xo_sample(samples_dir: Path, zstd_exe: str, into: Path) -> tuple[Path, dict[str, Any]]:
    """The shared xo-chain3 sample (made by another VHD implementation), decompressed; its leaf and expected.json."""
    sample = samples_dir / "xo-chain3"
    expected: dict[str, Any] = json.loads((sample / "expected.json").read_text())
    for item in expected["chain"]:
        subprocess.run(
            [zstd_exe, "-q", "-d", str(sample / f"{item['file']}.zst"), "-o", str(into / item["file"])], check=True
        )
    return into / expected["leaf"], expected


def test_estimate_brackets_the_size_the_compressor_produces(
    run_imaging: RunImaging, tmp_path: Path, zstd_exe: str, samples_dir: Path
) -> None:
    # A realistic sample (64 MiB, 10 MiB allocated): on disks of a few KiB the frames' fixed bytes dominate.
    leaf, expected = unpack_xo_sample(samples_dir, zstd_exe, tmp_path)
    estimate = ok_json(run_imaging("vhd", "estimate", leaf, "--json"))
    image = tmp_path / "image.vhd.zst"
    stats = ok_json(run_imaging("vhd", "export", leaf, image, "--format", "vhd.zst", "--json"))
    assert estimate["low"] <= stats["compressed_bytes"] <= estimate["high"]
    assert abs(estimate["compressed_bytes"] - stats["compressed_bytes"]) <= 0.02 * stats["compressed_bytes"]
    assert estimate["allocated_bytes"] + estimate["unallocated_bytes"] == expected["virtual_size"]
    human = run_imaging("vhd", "estimate", leaf, "--level", "1")
    assert human.returncode == 0 and "zstd level 1" in human.stdout and "range" in human.stdout


def test_export_human_output_and_progress(run_imaging: RunImaging, tmp_path: Path, chain3: DiskModel) -> None:
    out = tmp_path / "flat.raw"
    result = run_imaging("vhd", "export", chain3.leaf, out, "--progress")
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "12 MiB (12582912 bytes)" in result.stdout
    assert out.read_bytes() == chain3.data


def test_export_refuses_to_overwrite_unless_forced(run_imaging: RunImaging, tmp_path: Path, chain3: DiskModel) -> None:
    out = tmp_path / "flat.raw"
    out.write_bytes(b"old")
    assert_user_error(run_imaging("vhd", "export", chain3.leaf, out), "already exists")
    assert out.read_bytes() == b"old"
    assert run_imaging("vhd", "export", chain3.leaf, out, "--force").returncode == 0
    assert out.read_bytes() == chain3.data
    # Never over one of the chain's own files, even with --force.
    before = chain3.layers[0].read_bytes()
    assert_user_error(run_imaging("vhd", "export", chain3.leaf, chain3.layers[0], "--force"), "layer of the chain")
    assert chain3.layers[0].read_bytes() == before


def test_export_of_sample_chain_by_another_implementation(
    run_imaging: RunImaging, tmp_path: Path, zstd_exe: str, samples_dir: Path
) -> None:
    leaf, expected = unpack_xo_sample(samples_dir, zstd_exe, tmp_path)
    info = ok_json(run_imaging("vhd", "info", leaf, "--json"))
    assert info["depth"] == expected["depth"]
    assert info["virtual_size"] == expected["virtual_size"]
    assert [(Path(c["path"]).name, c["file_size"]) for c in info["chain"]] == [
        (c["file"], c["bytes"]) for c in expected["chain"]
    ]
    # vhd-lib leaves the parent timestamps at zero: a warning, not an error.
    assert info["warnings"] and info["warnings"] == vhdcore.open_chain(str(leaf)).warnings
    human = run_imaging("vhd", "info", leaf)
    assert human.returncode == 0 and "warnings:" in human.stdout
    raw = tmp_path / "flat.raw"
    ok_json(run_imaging("vhd", "export", leaf, raw, "--json"))
    assert hashlib.sha256(raw.read_bytes()).hexdigest() == expected["sha256_raw"]


# --- check --------------------------------------------------------------------------------------------------------


def test_check_healthy_chain(run_imaging: RunImaging, chain3: DiskModel) -> None:
    result = ok_json(run_imaging("vhd", "check", chain3.leaf, "--json"))
    assert result == {"path": str(chain3.leaf), "ok": True, "problems": []}
    human = run_imaging("vhd", "check", chain3.leaf)
    assert human.returncode == 0 and "no problems" in human.stdout


def corrupt_footer_checksum(path: Path) -> None:
    """Flip a byte of the footer's checksum field (footer at the end of the file, checksum at offset 64)."""
    data = bytearray(path.read_bytes())
    data[-512 + 64] ^= 0xFF
    path.write_bytes(bytes(data))


def test_check_lists_problems_and_exits_1(run_imaging: RunImaging, chain3: DiskModel) -> None:
    corrupt_footer_checksum(chain3.layers[1])
    expected = vhdcore.check(str(chain3.leaf))
    assert expected, "vhdcore.check found nothing in a corrupted chain"

    result = run_imaging("vhd", "check", chain3.leaf, "--json")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    report = json.loads(result.stdout)
    assert report["ok"] is False
    assert [(p["kind"], p["field"], p["offset"], p["message"]) for p in report["problems"]] == [
        (p.kind, p.field, p.offset, p.message) for p in expected
    ]
    assert_user_error(result, "problem")

    human = run_imaging("vhd", "check", chain3.leaf)
    assert_user_error(human, "problem")
    for problem in expected:
        assert problem.message in human.stdout


# --- bad input: exit 1, one line, no traceback --------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ["info", "{missing}"],
        ["check", "{missing}"],
        ["map", "{missing}"],
        ["diff", "{missing}", "{leaf}"],
        ["diff", "{leaf}", "{missing}"],
        ["export", "{missing}", "{tmp}/out.raw"],
        ["snapshot", "{missing}", "{tmp}/child.vhd"],
        ["write", "{missing}", "0", "{leaf}"],
        ["write", "{leaf}", "0", "{missing}"],
    ],
)
def test_missing_file_is_a_bad_input(
    run_imaging: RunImaging, tmp_path: Path, chain3: DiskModel, args: list[str]
) -> None:
    values = {"missing": str(tmp_path / "no-such.vhd"), "leaf": str(chain3.leaf), "tmp": str(tmp_path)}
    result = run_imaging("vhd", *(arg.format(**values) for arg in args))
    assert_user_error(result, "no-such.vhd")


@pytest.mark.parametrize("command", ["info", "map", "export", "snapshot", "write"])
def test_garbage_file_is_a_bad_input(run_imaging: RunImaging, tmp_path: Path, command: str) -> None:
    garbage = tmp_path / "garbage.vhd"
    garbage.write_bytes(b"this is not a VHD at all " * 1000)
    extra = {
        "info": [],
        "map": [],
        "export": [str(tmp_path / "out.raw")],
        "snapshot": [str(tmp_path / "child.vhd")],
        "write": ["0", str(garbage)],
    }[command]
    assert_user_error(run_imaging("vhd", command, garbage, *extra), "garbage.vhd")
    assert not (tmp_path / "out.raw").exists()
    assert not (tmp_path / "child.vhd").exists()


def test_garbage_file_check_lists_a_problem(run_imaging: RunImaging, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.vhd"
    garbage.write_bytes(b"\x00garbage" * 100)
    result = run_imaging("vhd", "check", garbage, "--json")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert json.loads(result.stdout)["problems"]


def test_corrupt_parent_is_a_bad_input(run_imaging: RunImaging, chain3: DiskModel) -> None:
    corrupt_footer_checksum(chain3.layers[0])
    line = assert_user_error(run_imaging("vhd", "info", chain3.leaf))
    assert "base.vhd" in line


def test_missing_parent_is_a_bad_input(run_imaging: RunImaging, chain3: DiskModel) -> None:
    chain3.layers[1].rename(chain3.layers[1].with_name("moved.vhd"))
    assert_user_error(run_imaging("vhd", "map", chain3.leaf))
    result = run_imaging("vhd", "check", chain3.leaf, "--json")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "missing_parent" in {p["kind"] for p in json.loads(result.stdout)["problems"]}


@pytest.mark.parametrize("via_stdin", [False, True])
def test_write_past_end_is_a_bad_input(
    run_imaging: RunImaging, tmp_path: Path, chain3: DiskModel, via_stdin: bool
) -> None:
    before = [layer.read_bytes() for layer in chain3.layers]
    payload = b"\xab" * 1024
    offset = chain3.virtual_size - 512
    if via_stdin:
        result = run_imaging("vhd", "write", chain3.leaf, str(offset), "-", input=payload)
    else:
        src = tmp_path / "payload.bin"
        src.write_bytes(payload)
        result = run_imaging("vhd", "write", chain3.leaf, str(offset), src)
    assert_user_error(result, "past the end")
    assert [layer.read_bytes() for layer in chain3.layers] == before


def test_write_at_human_offset(run_imaging: RunImaging, tmp_path: Path, chain3: DiskModel) -> None:
    ok_json(run_imaging("vhd", "write", chain3.leaf, "1M", "-", "--json", input=b"hello"))
    chain3.apply(MIB, b"hello")
    assert vhdcore.open_chain(str(chain3.leaf)).read(0, chain3.virtual_size) == chain3.data


def test_runs_from_any_directory_and_has_version(imaging_exe: str, tmp_path: Path) -> None:
    result = subprocess.run([imaging_exe, "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0 and "imaging" in result.stdout
    result = subprocess.run([imaging_exe, "vhd", "--help"], capture_output=True, text=True, cwd="/")
    assert result.returncode == 0
    for command in ["info", "check", "map", "diff", "export", "create", "snapshot", "write"]:
        assert command in result.stdout
