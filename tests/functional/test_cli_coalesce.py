"""`imaging vhd coalesce PATH` end to end: the real console script, checked by exporting the chain before and after."""

from __future__ import annotations

import hashlib
import json
import random
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import vhdcore

pytestmark = pytest.mark.functional

MIB = 1024 * 1024
RunImaging = Callable[..., subprocess.CompletedProcess[str]]


def build_chain(folder: Path, depth: int, seed: int) -> list[Path]:
    """A chain of `depth` layers (base first) on a 16 MiB disk, with whole-block, spanning and partial writes."""
    rng = random.Random(seed)
    size = 16 * MIB
    folder.mkdir(exist_ok=True)
    base = folder / "base.vhd"
    vhdcore.create(str(base), size)
    layers = [base]
    for level in range(depth):
        for offset, length in [(rng.randrange(8) * 2 * MIB, 2 * MIB), (rng.randrange(size - 5 * MIB), 3 * MIB + 5)]:
            vhdcore.write(str(layers[-1]), offset, rng.randbytes(length))
        vhdcore.write(str(layers[-1]), rng.randrange(size - 1000) | 3, rng.randbytes(700))
        if level + 1 < depth:
            child = folder / f"layer{level + 1}.vhd"
            vhdcore.snapshot(str(layers[-1]), str(child))
            layers.append(child)
    return layers


def ok_json(result: subprocess.CompletedProcess[str]) -> Any:
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return json.loads(result.stdout)


def content_sha(run_imaging: RunImaging, leaf: Path) -> str:
    out = leaf.parent.parent / f"{leaf.stem}-flat.raw"
    out.unlink(missing_ok=True)
    result = run_imaging("vhd", "export", leaf, out)
    assert result.returncode == 0, result.stderr
    digest = hashlib.sha256(out.read_bytes()).hexdigest()
    out.unlink()
    return digest


def test_coalesce_json_reports_merges_and_keeps_content(run_imaging: RunImaging, tmp_path: Path) -> None:
    layers = build_chain(tmp_path / "sr", 4, 1)
    leaf = layers[-1]
    before = content_sha(run_imaging, leaf)
    report = ok_json(run_imaging("vhd", "coalesce", leaf, "--json"))
    assert report["done"] is True
    assert report["depth_before"] == 4
    assert report["depth"] == 2
    assert report["layers_merged"] == 2
    assert [Path(m["layer"]).name for m in report["merges"]] == ["layer1.vhd", "layer2.vhd"]
    assert report["bytes_copied"] == sum(m["bytes_copied"] for m in report["merges"]) > 0
    assert report["duplicate_bytes"] == sum(m["duplicate_bytes"] for m in report["merges"])
    assert report["file_bytes_freed"] > 0
    assert report["pending"] is None
    assert content_sha(run_imaging, leaf) == before
    checked = ok_json(run_imaging("vhd", "check", leaf, "--json"))
    assert checked["ok"] is True
    info = ok_json(run_imaging("vhd", "info", leaf, "--json"))
    assert [Path(layer["path"]).name for layer in info["chain"]] == ["layer3.vhd", "base.vhd"]
    again = ok_json(run_imaging("vhd", "coalesce", leaf, "--json"))
    assert again["layers_merged"] == 0
    assert again["done"] is True


def test_budget_slices_pause_and_resume(run_imaging: RunImaging, tmp_path: Path) -> None:
    layers = build_chain(tmp_path / "sr", 3, 2)
    leaf = layers[-1]
    before = content_sha(run_imaging, leaf)
    first = ok_json(run_imaging("vhd", "coalesce", leaf, "--budget-bytes", "1M", "--json"))
    assert first["done"] is False
    assert first["pending"]["phase"] == "copy"
    assert 0 < first["pending"]["bytes_copied"] < first["pending"]["bytes_total"]
    info = ok_json(run_imaging("vhd", "info", leaf, "--json"))
    assert any("coalesce of this chain is pending" in w for w in info["warnings"])
    assert content_sha(run_imaging, leaf) == before
    slices = 1
    while True:
        step = ok_json(run_imaging("vhd", "coalesce", leaf, "--budget-bytes", "1M", "--json"))
        slices += 1
        assert step["recovered"] is True or step["done"] is True
        if step["done"]:
            break
        assert slices < 50
    assert slices > 2
    assert content_sha(run_imaging, leaf) == before
    assert ok_json(run_imaging("vhd", "info", leaf, "--json"))["depth"] == 2


def test_a_zero_second_budget_still_copies_one_block(run_imaging: RunImaging, tmp_path: Path) -> None:
    layers = build_chain(tmp_path / "sr", 3, 5)
    leaf = layers[-1]
    before = content_sha(run_imaging, leaf)
    first = ok_json(run_imaging("vhd", "coalesce", leaf, "--budget-seconds", "0", "--json"))
    assert first["done"] is False
    assert 0 < first["pending"]["bytes_copied"] <= 2 * MIB
    done = ok_json(run_imaging("vhd", "coalesce", leaf, "--json"))
    assert done["recovered"] is True and done["done"] is True
    assert content_sha(run_imaging, leaf) == before
    assert ok_json(run_imaging("vhd", "info", leaf, "--json"))["depth"] == 2


def test_text_output_names_layers_left_alone(run_imaging: RunImaging, tmp_path: Path) -> None:
    layers = build_chain(tmp_path / "sr", 3, 3)
    vhdcore.snapshot(str(layers[0]), str(tmp_path / "sr" / "clone.vhd"))
    result = run_imaging("vhd", "coalesce", layers[-1], "--progress")
    assert result.returncode == 0, result.stderr
    assert "coalesced" in result.stdout
    assert "0 layers merged" in result.stdout
    assert "left alone:" in result.stdout
    assert "clone.vhd" in result.stdout


def test_errors_are_one_line_with_hints(run_imaging: RunImaging, tmp_path: Path) -> None:
    missing = run_imaging("vhd", "coalesce", tmp_path / "nope.vhd")
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: ")
    assert "Traceback" not in missing.stderr

    usage = run_imaging("vhd", "coalesce", tmp_path / "nope.vhd", "--budget-bytes", "lots")
    assert usage.returncode == 2
    assert "Traceback" not in usage.stderr

    # A pending journal and an unreadable child header (as a crash in the relink could leave): reads say so.
    layers = build_chain(tmp_path / "sr", 3, 4)
    leaf = layers[-1]
    ok_json(run_imaging("vhd", "coalesce", leaf, "--budget-bytes", "1", "--json"))
    header = bytearray(leaf.read_bytes()[512:1536])
    damaged = bytes(header[:600]) + bytes([header[600] ^ 0xFF]) + bytes(header[601:])
    with leaf.open("r+b") as fh:
        fh.seek(512)
        fh.write(damaged)
    info = run_imaging("vhd", "info", leaf)
    assert info.returncode == 1
    lines = info.stderr.splitlines()
    assert len(lines) == 2, info.stderr
    assert lines[0].startswith("error: ") and "coalesce of this chain was interrupted" in lines[0]
    assert lines[1].startswith("hint: ") and "imaging vhd coalesce" in lines[1]
    with leaf.open("r+b") as fh:
        fh.seek(512)
        fh.write(bytes(header))
    done = ok_json(run_imaging("vhd", "coalesce", leaf, "--json"))
    assert done["done"] is True and done["depth"] == 2
