"""Coalesce through the Python binding: the flattened content is unchanged (vhdcore's export and pyvhd's independent
reader), the chain is valid and shorter, the leaf keeps its bytes, qemu-img reads the base alone, and a process
killed at random points (SIGKILL) or at the crash hook's write points always leaves a chain the next run finishes.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import vhdcore
from tests.support import pyvhd
from tests.support.crash_build import build_test_utils_module
from tests.support.qemu import have_qemu
from tests.support.samples import Sample

MIB = 1024 * 1024
KIB = 1024
JOURNAL = ".vhdcore-coalesce.journal"
CRASH_ENV = "VHDCORE_COALESCE_CRASH_AFTER"


@dataclass
class Chain:
    layers: list[Path]  # base first
    model: bytearray

    @property
    def leaf(self) -> Path:
        return self.layers[-1]


def build_chain(folder: Path, depth: int, seed: int, size: int = 32 * MIB, block: int = 2 * MIB) -> Chain:
    """A chain of `depth` layers written with vhdcore: whole blocks, overlapping spans, partial sectors."""
    rng = random.Random(seed)
    model = bytearray(size)
    base = folder / "layer0.vhd"
    vhdcore.create(str(base), size, "dynamic", block)
    layers = [base]
    for level in range(depth):
        leaf = layers[-1]
        writes = [
            (rng.randrange(size // block) * block, rng.randbytes(block)),  # a whole block
            (rng.randrange(size - 3 * block), rng.randbytes(rng.randrange(1, 3 * block))),  # spans blocks
            (rng.randrange(size - 600) | 7, rng.randbytes(rng.randrange(1, 600))),  # partial sectors
            (rng.randrange(size - 4096), bytes(4096)),  # zeros over data
        ]
        for offset, data in writes:
            vhdcore.write(str(leaf), offset, data)
            model[offset : offset + len(data)] = data
        if level + 1 < depth:
            child = folder / f"layer{level + 1}.vhd"
            vhdcore.snapshot(str(leaf), str(child))
            layers.append(child)
    return Chain(layers, model)


def siblings(folder: Path) -> list[str]:
    return sorted(str(p) for p in folder.iterdir() if p.is_file() and not p.name.startswith(JOURNAL))


def export_raw(leaf: Path, out: Path) -> bytes:
    out.unlink(missing_ok=True)
    vhdcore.open_chain(str(leaf)).export(str(out))
    data = out.read_bytes()
    out.unlink()
    return data


def leaf_body(leaf: Path) -> bytes:
    """The leaf's bytes with its header and parent locator data blanked: what coalesce must not change."""
    data = bytearray(leaf.read_bytes())
    header_offset, header = pyvhd.read_header(leaf)
    data[header_offset : header_offset + 1024] = bytes(1024)
    for locator in header.locators:
        if locator.code != pyvhd.PLATFORM_NONE:
            space = locator.data_space if locator.data_space >= 512 else locator.data_space * 512
            data[locator.data_offset : locator.data_offset + space] = bytes(space)
    return bytes(data)


@pytest.mark.parametrize(("depth", "seed"), [(3, 1), (4, 2), (5, 3), (6, 4)])
def test_coalesce_keeps_content_and_leaves_leaf_on_base(tmp_path: Path, depth: int, seed: int) -> None:
    chain = build_chain(tmp_path, depth, seed)
    before = export_raw(chain.leaf, tmp_path.parent / f"before-{seed}.raw")
    assert before == chain.model
    leaf_before = leaf_body(chain.leaf)

    report = vhdcore.coalesce(str(chain.leaf), siblings(tmp_path), step_bytes=4 * MIB)

    assert report.depth_before == depth
    assert report.depth == min(depth, 2)
    assert len(report.merges) == max(depth - 2, 0)
    assert report.bytes_copied == sum(m.bytes_copied for m in report.merges)
    assert export_raw(chain.leaf, tmp_path.parent / f"after-{seed}.raw") == chain.model
    assert pyvhd.flatten(chain.leaf) == chain.model, "pyvhd's independent reader disagrees"
    assert vhdcore.check(str(chain.leaf)) == []
    assert leaf_body(chain.leaf) == leaf_before, "the leaf changed beyond its parent pointer"
    for merged in chain.layers[1:-1]:
        assert not merged.exists()
    opened = vhdcore.open_chain(str(chain.leaf))
    assert [Path(layer.path) for layer in opened.layers] == [chain.leaf, chain.layers[0]][: opened.depth]
    assert not (tmp_path / JOURNAL).exists()


@pytest.mark.skipif(not have_qemu(), reason="qemu-img not installed")
def test_qemu_reads_the_coalesced_base_alone(tmp_path: Path) -> None:
    chain = build_chain(tmp_path, 5, 7)
    # An empty leaf: after the coalesce the base alone holds the whole disk.
    leaf = tmp_path / "leaf.vhd"
    vhdcore.snapshot(str(chain.leaf), str(leaf))
    vhdcore.coalesce(str(leaf), siblings(tmp_path))
    assert vhdcore.open_chain(str(leaf)).depth == 2
    raw = tmp_path / "base.raw"
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(chain.layers[0]), str(raw)], check=True)
    assert raw.read_bytes() == chain.model


def test_mixed_block_sizes_and_macx_locators_from_pyvhd(tmp_path: Path) -> None:
    """A chain by the independent writer: 2 MiB base, 512 KiB and 64 KiB children, MacX + W2ku locators."""
    size = 8 * MIB
    rng = random.Random(5)
    model = bytearray(size)
    paths: list[Path] = []
    for level, block in enumerate([2 * MIB, 512 * KIB, 64 * KIB, 1 * MIB]):
        writes = [(rng.randrange(size - 9000), rng.randbytes(rng.randrange(1, 9000))) for _ in range(6)]
        writes.append((rng.randrange(size // block) * block, rng.randbytes(block)))
        sectors = pyvhd.sectors_from_writes(writes, base=bytes(model))
        for offset, data in writes:
            model[offset : offset + len(data)] = data
        parent = None
        if paths:
            name = paths[-1].name
            parent = pyvhd.ParentSpec.of(paths[-1], locators=[pyvhd.macx(name), pyvhd.w2ku(name)])
        spec = pyvhd.DynamicSpec(
            virtual_size=size, sectors=sectors, block_size=block, parent=parent, block_order="shuffled", seed=level
        )
        data, _ = pyvhd.build_dynamic(spec)
        paths.append(pyvhd.write_file(tmp_path / f"l{level}.vhd", data))
    assert pyvhd.flatten(paths[-1]) == model
    report = vhdcore.coalesce(str(paths[-1]), siblings(tmp_path))
    assert len(report.merges) == 2
    assert pyvhd.flatten(paths[-1]) == model
    assert export_raw(paths[-1], tmp_path.parent / "mixed.raw") == model
    assert vhdcore.check(str(paths[-1])) == []
    leaf = pyvhd.VhdFile(paths[-1])
    assert leaf.parent_uuid == pyvhd.VhdFile(paths[0]).uuid
    _, header = pyvhd.read_header(paths[-1])
    codes = {loc.code for loc in header.locators if loc.code != pyvhd.PLATFORM_NONE}
    assert pyvhd.PLATFORM_MACX in codes, "the MacX locator is rewritten, not dropped"
    assert {c.name for c in leaf.parent_candidates()} == {"l0.vhd"}


def test_chain_written_by_xen_orchestra(tmp_path: Path, xo_chain3: Sample) -> None:
    """vhd-lib's chain: a W2ku locator only, so the new W2ru locator is appended and the leaf's footer moves."""
    for path in xo_chain3.folder.iterdir():
        shutil.copy(path, tmp_path / path.name)
    leaf = tmp_path / xo_chain3.leaf.name
    size_before = leaf.stat().st_size
    report = vhdcore.coalesce(str(leaf), siblings(tmp_path))
    assert [Path(m.layer).name for m in report.merges] == ["layer1.vhd"]
    data = vhdcore.open_chain(str(leaf)).read(0, xo_chain3.expected["virtual_size"])
    assert hashlib.sha256(data).hexdigest() == xo_chain3.expected["sha256_raw"]
    assert hashlib.sha256(pyvhd.flatten(leaf)).hexdigest() == xo_chain3.expected["sha256_raw"]
    assert vhdcore.check(str(leaf)) == []
    assert leaf.stat().st_size > size_before, "the new locator was appended"
    assert {c.name for c in pyvhd.VhdFile(leaf).parent_candidates()} == {"layer0.vhd"}


def test_a_parent_with_another_child_is_reported(tmp_path: Path) -> None:
    chain = build_chain(tmp_path, 3, 9)
    vhdcore.snapshot(str(chain.layers[0]), str(tmp_path / "other-child.vhd"))
    report = vhdcore.coalesce(str(chain.leaf), siblings(tmp_path))
    assert report.merges == []
    assert [Path(s.layer).name for s in report.skipped] == ["layer1.vhd"]
    assert "other-child.vhd" in report.skipped[0].reason
    # Without the sibling list the other child is unknown: the caller's list is what protects it.
    assert export_raw(chain.leaf, tmp_path.parent / "kept.raw") == chain.model


def test_steps_are_bounded_and_resume(tmp_path: Path) -> None:
    chain = build_chain(tmp_path, 4, 11)
    steps = []
    while True:
        step = vhdcore.coalesce_step(str(chain.leaf), siblings(tmp_path), budget_bytes=1)
        steps.append(step)
        assert step.bytes_copied <= 2 * MIB
        # Between slices the chain reads the same, and says a coalesce is pending.
        opened = vhdcore.open_chain(str(chain.leaf))
        if not step.done and step.pending is not None:
            assert any("coalesce of this chain is pending" in w for w in opened.warnings)
        if step.done:
            break
        assert len(steps) < 500
    assert len(steps) > 3
    assert export_raw(chain.leaf, tmp_path.parent / "steps.raw") == chain.model
    with pytest.raises(vhdcore.InvalidArgumentError):
        vhdcore.coalesce_step(str(chain.leaf), [], budget_seconds=float("nan"))


# --- crashes --------------------------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import sys, vhdcore
    leaf, folder = sys.argv[1], sys.argv[2]
    import os
    files = sorted(os.path.join(folder, n) for n in os.listdir(folder) if not n.startswith(".vhdcore-coalesce"))
    print("ready", flush=True)
    vhdcore.coalesce(leaf, files, step_bytes=2 * 1024 * 1024)
    """
)


@pytest.fixture(scope="module")
def crash_template(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str], str]:
    """A depth-5 chain on 64 MiB disks with 2 MiB blocks, and the sha256 of its flattened content."""
    folder = tmp_path_factory.mktemp("crash-template")
    rng = random.Random(2024)
    size = 64 * MIB
    model = bytearray(size)
    base = folder / "layer0.vhd"
    vhdcore.create(str(base), size)
    layers = [base]
    for level in range(5):
        for _ in range(6):
            block = rng.randrange(size // (2 * MIB))
            offset = block * 2 * MIB + rng.choice([0, 511, 4096, 2 * MIB - 700])
            data = rng.randbytes(min(rng.choice([512, 70_000, 2 * MIB]), size - offset))
            vhdcore.write(str(layers[-1]), offset, data)
            model[offset : offset + len(data)] = data
        if level < 4:
            child = folder / f"layer{level + 1}.vhd"
            vhdcore.snapshot(str(layers[-1]), str(child))
            layers.append(child)
    return folder, [p.name for p in layers], hashlib.sha256(model).hexdigest()


def fresh_copy(template: tuple[Path, list[str], str], into: Path) -> Path:
    folder, names, _ = template
    if into.exists():
        shutil.rmtree(into)
    into.mkdir()
    for name in names:
        shutil.copy(folder / name, into / name)
    return into / names[-1]


def content_sha(leaf: Path) -> str:
    return hashlib.sha256(export_raw(leaf, leaf.parent / "flat.raw")).hexdigest()


@pytest.fixture(scope="module")
def hooked(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a child that imports the vhdcore built with its crash hook (cargo feature test-utils)."""
    folder = build_test_utils_module(tmp_path_factory.mktemp("vhdcore-test-utils"))
    return {"PYTHONPATH": os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])])}


def start_child(leaf: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-c", CHILD, str(leaf), str(leaf.parent)],
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_ready(child: subprocess.Popen[bytes]) -> None:
    """Blocks until the child has imported vhdcore and is about to coalesce."""
    assert child.stdout is not None
    assert child.stdout.readline() == b"ready\n"


def journal_phase(folder: Path) -> str | None:
    journal = folder / JOURNAL
    if not journal.exists():
        return None
    body = journal.read_bytes().split(b"\n", 2)[2]
    return str(json.loads(body)["phase"])


def finish_and_verify(leaf: Path, expected_sha: str, context: str) -> None:
    report = vhdcore.coalesce(str(leaf), siblings(leaf.parent))
    assert report.depth == 2, context
    assert content_sha(leaf) == expected_sha, f"{context}: content changed"
    assert vhdcore.check(str(leaf)) == [], context
    assert not (leaf.parent / JOURNAL).exists(), context


def test_sigkill_at_random_points_is_always_recovered(
    tmp_path: Path, crash_template: tuple[Path, list[str], str]
) -> None:
    """At least 50 runs, each SIGKILLed at a seeded random time within a clean coalesce's duration."""
    _, _, expected = crash_template
    leaf = fresh_copy(crash_template, tmp_path / "timing")
    child = start_child(leaf)
    wait_ready(child)
    started = time.monotonic()
    assert child.wait(timeout=120) == 0, child.stderr.read() if child.stderr else ""
    duration = time.monotonic() - started
    assert content_sha(leaf) == expected

    rng = random.Random(5)
    kills = attempts = 0
    phases: dict[str | None, int] = {}
    while kills < 50:
        attempts += 1
        assert attempts < 200, f"only {kills} kills landed in {attempts} runs"
        leaf = fresh_copy(crash_template, tmp_path / "run")
        child = start_child(leaf)
        wait_ready(child)
        delay = rng.uniform(0, duration)
        try:
            child.wait(timeout=delay)  # the random kill point; returns early if the run already finished
        except subprocess.TimeoutExpired:
            child.send_signal(signal.SIGKILL)
            child.wait()
        if child.returncode == -signal.SIGKILL:
            kills += 1
            phase = journal_phase(leaf.parent)
            phases[phase] = phases.get(phase, 0) + 1
        else:
            assert child.returncode == 0
        finish_and_verify(leaf, expected, f"run {attempts} (killed after {delay:.3f} s)")
    print(f"{kills} kills in {attempts} runs (clean coalesce {duration:.3f} s); journal phase at the kill: {phases}")
    assert kills >= 50
    assert sum(n for phase, n in phases.items() if phase is not None) >= 25, f"too few kills mid-merge: {phases}"


def test_the_release_module_has_no_crash_hook(tmp_path: Path, crash_template: tuple[Path, list[str], str]) -> None:
    """The module the tests import is the release build (as the wheel and the Lambda layer): the variable that makes
    the test build abort at its first write is ignored, and the coalesce completes."""
    _, _, expected = crash_template
    leaf = fresh_copy(crash_template, tmp_path / "release")
    child = start_child(leaf, {CRASH_ENV: "1"})
    assert child.wait(timeout=120) == 0, child.stderr.read() if child.stderr else ""
    assert vhdcore.open_chain(str(leaf)).depth == 2
    assert content_sha(leaf) == expected


def test_crash_hook_aborts_at_write_points_and_the_next_run_finishes(
    tmp_path: Path, crash_template: tuple[Path, list[str], str], hooked: dict[str, str]
) -> None:
    """The deterministic hook: abort (torn write) at the n-th write/sync/rename of the run, for seeded points."""
    _, _, expected = crash_template
    rng = random.Random(6)
    points = sorted({1, 2, 3, 4, 5, *(rng.randrange(6, 400) for _ in range(15))})
    aborted = 0
    for point in points:
        leaf = fresh_copy(crash_template, tmp_path / "hook")
        child = start_child(leaf, {**hooked, CRASH_ENV: str(point)})
        child.wait(timeout=120)
        if child.returncode == -signal.SIGABRT:
            aborted += 1
        else:
            assert child.returncode == 0, child.stderr.read() if child.stderr else ""
        finish_and_verify(leaf, expected, f"crash point {point}")
    assert aborted >= len(points) // 2, f"only {aborted} of {len(points)} points were reached"


def test_crash_hook_at_every_write_point_of_the_xen_orchestra_chain(
    tmp_path: Path, xo_chain3: Sample, hooked: dict[str, str]
) -> None:
    """Every write point of a merge whose relink appends a locator and moves the leaf's footer."""
    expected = xo_chain3.expected["sha256_raw"]
    size = xo_chain3.expected["virtual_size"]
    aborted = 0
    for point in range(1, 500):
        folder = tmp_path / "xo"
        if folder.exists():
            shutil.rmtree(folder)
        shutil.copytree(xo_chain3.folder, folder)
        leaf = folder / xo_chain3.leaf.name
        child = start_child(leaf, {**hooked, CRASH_ENV: str(point)})
        wait_ready(child)
        child.wait(timeout=120)
        if child.returncode == 0:
            break
        assert child.returncode == -signal.SIGABRT, child.stderr.read() if child.stderr else ""
        aborted += 1
        vhdcore.coalesce(str(leaf), siblings(folder))
        data = vhdcore.open_chain(str(leaf)).read(0, size)
        assert hashlib.sha256(data).hexdigest() == expected, f"crash point {point}: content changed"
        assert vhdcore.check(str(leaf)) == [], f"crash point {point}"
    print(f"xo-chain3: recovered from an abort at each of {aborted} write points")
    assert aborted >= 10, f"only {aborted} write points"
