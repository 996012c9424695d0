"""Nothing the CLI writes overwrites a file without `--force`, and never, even with it, a layer of a registered server's
chain or of the chain being read (issue 14, item 1); and the small ones of item 9: foreign formats named, `vhd diff`
exit codes, `--chunk-size` checked, `image show` of an ACTIVE image, coalesce's `recovered` flag. All through the
real console script in subprocesses, with the state under a data directory of the test's own."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

import vhdcore

pytestmark = pytest.mark.functional

MIB = 1024 * 1024
Cli = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def cli(imaging_exe: str, tmp_path: Path) -> Cli:
    env = {**os.environ, "IMAGING_DATA_DIR": str(tmp_path / "data"), "COLUMNS": "200", "NO_COLOR": "1"}
    for name in ("IMAGING_STORE", "IMAGING_STATE", "IMAGING_DISKS"):
        env.pop(name, None)

    def run(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[str]:
        argv = [imaging_exe, *map(str, args)]
        return subprocess.run(argv, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)

    return run


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (result.stdout, result.stderr)
    return result


def refused(result: subprocess.CompletedProcess[str], *needles: str) -> str:
    """Exit code 1, one `error:` line (and at most a `hint:` line), no traceback; the error line."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert 1 <= len(lines) <= 2 and lines[0].startswith("error: "), result.stderr
    assert len(lines) == 1 or lines[1].startswith("hint: "), result.stderr
    for needle in needles:
        assert needle in lines[0], result.stderr
    return lines[0]


def digest(*paths: Path) -> dict[str, str]:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}


def make_chain(folder: Path, size: int = 8 * MIB) -> tuple[Path, Path]:
    """base.vhd with data, and leaf.vhd, its differencing child with data of its own."""
    folder.mkdir(parents=True, exist_ok=True)
    base, leaf = folder / "base.vhd", folder / "leaf.vhd"
    vhdcore.create(str(base), size)
    vhdcore.write(str(base), 0, b"base data " * 50_000)
    vhdcore.snapshot(str(base), str(leaf))
    vhdcore.write(str(leaf), 3 * MIB + 5, b"leaf data " * 20_000)
    return base, leaf


@pytest.fixture
def registered(cli: Cli, tmp_path: Path) -> tuple[Path, Path]:
    """A chain in srv/web1 registered as server web1."""
    base, leaf = make_chain(tmp_path / "srv" / "web1")
    ok(cli("server", "add", "web1", "--disk", leaf))
    return base, leaf


def test_vhd_export_never_overwrites_a_registered_layer(
    cli: Cli, tmp_path: Path, registered: tuple[Path, Path]
) -> None:
    base, leaf = registered
    other_base, other_leaf = make_chain(tmp_path / "other")
    (tmp_path / "link.vhd").symlink_to(base)
    os.link(base, tmp_path / "hard.vhd")
    before = digest(base, leaf)
    for out in (base, leaf, tmp_path / "link.vhd", tmp_path / "hard.vhd"):
        for force in ((), ("--force",)):
            for fmt in ("raw", "vhd", "vhd.zst"):
                line = refused(cli("vhd", "export", other_leaf, out, "--format", fmt, *force))
                assert "registered server web1" in line and "even with --force" in line
    # The chain being read: neither its leaf nor its base, even with --force.
    other_before = digest(other_base, other_leaf)
    for out in (other_base, other_leaf):
        refused(cli("vhd", "export", other_leaf, out, "--force"), "is a layer of the chain of")
    assert digest(base, leaf) == before and digest(other_base, other_leaf) == other_before
    assert sorted(p.name for p in base.parent.iterdir()) == ["base.vhd", "leaf.vhd"]  # no temporary left behind


def test_vhd_export_replaces_a_plain_file_only_with_force(cli: Cli, tmp_path: Path) -> None:
    _, leaf = make_chain(tmp_path / "chain")
    out = tmp_path / "disk.raw"
    out.write_bytes(b"precious")
    refused(cli("vhd", "export", leaf, out), "already exists")
    assert out.read_bytes() == b"precious"
    ok(cli("vhd", "export", leaf, out, "--force"))
    assert out.read_bytes() == vhdcore.open_chain(str(leaf)).read(0, 8 * MIB)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    folder = tmp_path / "folder"
    folder.mkdir()
    refused(cli("vhd", "export", leaf, folder, "--force"), "not a regular file")


def test_create_and_snapshot_never_touch_a_registered_layer(
    cli: Cli, tmp_path: Path, registered: tuple[Path, Path]
) -> None:
    base, leaf = registered
    before = digest(base, leaf)
    refused(cli("vhd", "create", base, "8M"), "registered server web1")
    refused(cli("vhd", "snapshot", leaf, base), "is a layer of")
    _, other_leaf = make_chain(tmp_path / "other")
    refused(cli("vhd", "snapshot", other_leaf, leaf), "registered server web1")
    assert digest(base, leaf) == before


def test_image_export_never_overwrites_a_layer_of_a_registered_server(
    cli: Cli, tmp_path: Path, registered: tuple[Path, Path]
) -> None:
    """The reported bug: `imaging image export IMG srv/web2/base.vhd --format vhd` overwrote a live layer."""
    base, _ = registered
    record = json.loads(ok(cli("image", "create", "web1", "--wait", "--json")).stdout)
    server = json.loads(ok(cli("server", "show", "web1", "--json")).stdout)
    layers = [Path(layer.path) for layer in vhdcore.open_chain(server["disk"]).layers]
    assert base.resolve() in [p.resolve() for p in layers]
    before = digest(*layers)
    for out in layers:
        for force in ((), ("--force",)):
            for fmt in ("vhd", "raw", "vhd.zst"):
                line = refused(cli("image", "export", record["id"], out, "--format", fmt, *force))
                assert "registered server web1" in line, line
    assert digest(*layers) == before

    plain = tmp_path / "exported.vhd"
    plain.write_bytes(b"keep me")
    refused(cli("image", "export", record["id"], plain, "--format", "vhd"), "already exists")
    assert plain.read_bytes() == b"keep me"
    ok(cli("image", "export", record["id"], plain, "--format", "vhd", "--force"))
    assert vhdcore.open_chain(str(plain)).read(0, 8 * MIB) == vhdcore.open_chain(server["disk"]).read(0, 8 * MIB)


def test_image_show_of_an_active_image_has_sizes_ratio_and_content_hash(cli: Cli, tmp_path: Path) -> None:
    _, leaf = make_chain(tmp_path / "chain")
    record = json.loads(ok(cli("image", "create", "--disk", leaf, "--wait", "--json")).stdout)
    shown = json.loads(ok(cli("image", "show", record["id"], "--json")).stdout)
    sizes, ratio = shown["sizes"], shown["ratio"]
    assert sizes["virtual"] == 8 * MIB
    assert sizes["compressed"] == record["compressed_size"] > 0
    assert 0 < sizes["live"] <= sizes["allocated"] <= sizes["virtual"]
    assert ratio["compressed_to_live"] == pytest.approx(sizes["compressed"] / sizes["live"])
    assert ratio["compressed_to_virtual"] == pytest.approx(sizes["compressed"] / sizes["virtual"])
    assert shown["content_sha256"] == record["manifest"]["content_sha256"]
    assert len(shown["content_sha256"]) == 64
    text = ok(cli("image", "show", record["id"])).stdout
    for label in ("virtual size:", "allocated:", "live data:", "compressed:", "ratio:", "content sha256:"):
        assert label in text, text
    assert shown["content_sha256"] in text and "of the live data" in text


def test_vhd_write_never_into_a_registered_layer(cli: Cli, tmp_path: Path, registered: tuple[Path, Path]) -> None:
    base, leaf = registered
    source = tmp_path / "payload.bin"
    source.write_bytes(b"x" * 4096)
    before = digest(base, leaf)
    for target in (base, leaf):
        for force in ((), ("--force",)):
            refused(cli("vhd", "write", target, "0", source, *force), "registered server web1")
    assert digest(base, leaf) == before


def test_vhd_write_into_a_parent_is_refused_unless_forced_and_check_tells(cli: Cli, tmp_path: Path) -> None:
    base, leaf = make_chain(tmp_path / "chain")
    source = tmp_path / "payload.bin"
    source.write_bytes(b"y" * 8192)
    ok(cli("vhd", "check", leaf))
    before = digest(base, leaf)
    line = refused(cli("vhd", "write", base, "1M", source), "has 1 child")
    assert leaf.name in line
    assert digest(base, leaf) == before
    ok(cli("vhd", "write", leaf, "1M", source))  # the leaf has no children
    ok(cli("vhd", "write", base, "6M", source, "--force"))
    assert vhdcore.open_chain(str(base)).read(6 * MIB, 8192) == b"y" * 8192
    ok(cli("vhd", "check", base))  # the parent itself is fine
    result = cli("vhd", "check", leaf, "--json")
    assert result.returncode == 1, result.stderr
    problems = json.loads(result.stdout)["problems"]
    assert [(Path(p["path"]).name, p["field"]) for p in problems] == [("leaf.vhd", "header.parent_timestamp")]
    assert "changed after this child was made" in problems[0]["message"]


@pytest.mark.parametrize(("fmt", "name"), [("qcow2", "qcow2"), ("vmdk", "VMDK"), ("vhdx", "VHDX"), ("raw", None)])
def test_a_foreign_image_is_named(cli: Cli, qemu_img: str, tmp_path: Path, fmt: str, name: str | None) -> None:
    path = tmp_path / f"disk.{fmt}"
    subprocess.run([qemu_img, "create", "-q", "-f", fmt, str(path), "64M"], check=True, timeout=60)
    checked = cli("vhd", "check", path)
    assert checked.returncode == 1 and "not a VHD" in checked.stdout, (checked.stdout, checked.stderr)
    info = cli("vhd", "info", path)
    assert "hint: imaging reads VHD disks and chains" in info.stderr  # not "run vhd check": it is no VHD at all
    for line in (refused(info, "not a VHD"), checked.stdout):
        if name is not None:
            assert f"this is a {name} image" in line
        else:
            assert "no known disk image signature" in line
        assert "qemu-img convert -O vpc" in line
    with pytest.raises(vhdcore.VhdFormatError):
        vhdcore.open_chain(str(path))


def test_vhd_diff_exit_code_says_whether_the_chains_differ(cli: Cli, tmp_path: Path) -> None:
    base, leaf = make_chain(tmp_path / "chain")
    same = cli("vhd", "diff", leaf, leaf, "--json")
    assert same.returncode == 0 and json.loads(same.stdout)["total"] == 0
    differ = cli("vhd", "diff", base, leaf, "--json")
    assert differ.returncode == 1 and json.loads(differ.stdout)["total"] > 0
    assert differ.stderr == ""
    human = cli("vhd", "diff", base, leaf)
    assert human.returncode == 1 and "total:" in human.stdout and human.stderr == ""
    assert "exit" in ok(cli("vhd", "diff", "--help")).stdout.lower()


def test_a_chunk_size_that_is_not_whole_blocks_is_refused(cli: Cli, tmp_path: Path) -> None:
    _, leaf = make_chain(tmp_path / "chain")
    for chunk in ("3M", "1M", "0", "100000"):
        refused(cli("vhd", "export", leaf, tmp_path / "out.zst", "--format", "vhd.zst", "--chunk-size", chunk), "block")
        refused(cli("vhd", "estimate", leaf, "--chunk-size", chunk), "not a multiple of the block size")
    assert not (tmp_path / "out.zst").exists()
    ok(cli("vhd", "export", leaf, tmp_path / "out.zst", "--format", "vhd.zst", "--chunk-size", "4M"))


def test_coalesce_reports_a_recovery_only_for_an_earlier_runs_work(cli: Cli, tmp_path: Path) -> None:
    """More than one 64 MiB step of work: the run's own later steps are no recovery."""

    def chain(folder: Path) -> Path:
        folder.mkdir()
        base, middle, leaf = (folder / n for n in ("base.vhd", "middle.vhd", "leaf.vhd"))
        vhdcore.create(str(base), 96 * MIB)
        vhdcore.snapshot(str(base), str(middle))
        vhdcore.write(str(middle), 0, bytes(range(256)) * (80 * MIB // 256))
        vhdcore.snapshot(str(middle), str(leaf))
        return leaf

    leaf = chain(tmp_path / "fresh")
    report = json.loads(ok(cli("vhd", "coalesce", leaf, "--json")).stdout)
    assert report["steps"] >= 2 and report["layers_merged"] == 1, report
    assert report["recovered"] is False
    assert "resumed" not in ok(cli("vhd", "coalesce", leaf)).stdout

    leaf = chain(tmp_path / "paused")
    paused = json.loads(ok(cli("vhd", "coalesce", leaf, "--budget-bytes", "2M", "--json")).stdout)
    assert paused["done"] is False and paused["recovered"] is False
    finished = json.loads(ok(cli("vhd", "coalesce", leaf, "--json")).stdout)
    assert finished["done"] is True and finished["recovered"] is True
