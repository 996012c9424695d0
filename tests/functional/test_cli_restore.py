"""`imaging image restore` and `imaging image export` as a user runs them (issue 14, item 5): child processes on a
file store and SQLite under IMAGING_DATA_DIR; the restored disk checked with qemu-img against the source chain
flattened by `imaging vhd export`, the exported streams with zstd and qemu-img; damaged objects, missing images and
the progress bar (none off a terminal, one on a pty)."""

from __future__ import annotations

import json
import os
import pty
import select
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import Run, assert_one_line_error, ok_json
from tests.support.pyvhd import flatten

REPO = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "statemachine.cli"]


@pytest.fixture
def image_of_leaf(cli: Run, leaf: Path) -> dict[str, Any]:
    """The ACTIVE image record (with its manifest) of the sample chain, registered as server web1."""
    assert cli("server", "add", "web1", "--disk", leaf).returncode == 0
    record: dict[str, Any] = ok_json(cli("image", "create", "web1", "--json"))
    return record


def stored_object(tmp_path: Path, image_id: str) -> Path:
    return tmp_path / "data" / "store" / "images" / image_id / "image.vhd.zst"


def damage(path: Path) -> None:
    """Flip bytes in the middle of the file (inside a frame of random data, of the sample's chunk 1 or 2)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    for at in range(middle, middle + 64):
        data[at] ^= 0xA5
    path.write_bytes(bytes(data))


def shell(tmp_path: Path, command: str) -> subprocess.CompletedProcess[bytes]:
    """`command` in bash with pipefail, `imaging` standing for this checkout's CLI with the test's data directory
    (the same settings as the `cli` fixture)."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "IMAGING_DATA_DIR": str(tmp_path / "data"),
        "IMAGING_CHUNK_SIZE": str(8 * 1024**2),
        "IMAGING_PART_SIZE": str(5 * 1024**2),
    }
    imaging = shlex.join(CLI)
    script = f'set -o pipefail; imaging() {{ {imaging} "$@"; }}; {command}'
    return subprocess.run(["bash", "-c", script], capture_output=True, cwd=tmp_path, env=env, timeout=300)


def qemu_identical(qemu_img: str, vhd: Path, raw: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [qemu_img, "compare", "-f", "vpc", "-F", "raw", str(vhd), str(raw)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_restore_makes_a_server_whose_disk_is_the_image_and_whose_new_image_has_the_same_content(
    cli: Run, tmp_path: Path, leaf: Path, image_of_leaf: dict[str, Any], qemu_img: str
) -> None:
    image_id, manifest = image_of_leaf["id"], image_of_leaf["manifest"]
    original = tmp_path / "original.raw"
    source = ok_json(cli("server", "show", "web1", "--json"))["disk"]  # the server's leaf, after its snapshot
    assert cli("vhd", "export", source, original, "--format", "raw").returncode == 0

    restored = ok_json(cli("image", "restore", image_id, "--server", "web2", "--json"))

    disk = Path(restored["disk"])
    assert disk.parent == tmp_path / "data" / "store" / "sr" / "web2"
    assert disk.suffix == ".vhd"
    assert sorted(p.name for p in disk.parent.iterdir()) == [disk.name]  # no temporary file left beside it
    assert restored["content_sha256"] == manifest["content_sha256"]
    assert (restored["server"]["id"], restored["server"]["disk"], restored["server"]["tenant"]) == (
        "web2",
        str(disk),
        "local",
    )
    assert ok_json(cli("server", "show", "web2", "--json"))["disk"] == str(disk)
    compared = qemu_identical(qemu_img, disk, original)
    assert compared.returncode == 0, compared.stdout + compared.stderr
    assert ok_json(cli("vhd", "info", disk, "--json"))["type"] == "dynamic"

    again = ok_json(cli("image", "create", "web2", "--json"))
    assert again["manifest"]["content_sha256"] == manifest["content_sha256"]
    assert (
        cli("vhd", "export", ok_json(cli("server", "show", "web2", "--json"))["disk"], tmp_path / "r.raw").returncode
        == 0
    )
    assert (tmp_path / "r.raw").read_bytes() == original.read_bytes() == flatten(leaf)


def test_two_restores_of_one_image_get_disks_of_their_own_uuid(
    cli: Run, tmp_path: Path, image_of_leaf: dict[str, Any]
) -> None:
    """Children find their parent by UUID: each restored disk has a new one (not the image VHD's), same content."""
    image_id, manifest = image_of_leaf["id"], image_of_leaf["manifest"]
    assert cli("image", "export", image_id, tmp_path / "image.vhd", "--format", "vhd").returncode == 0
    uuids = {ok_json(cli("vhd", "info", tmp_path / "image.vhd", "--json"))["uuid"]}
    for server in ("copy1", "copy2"):
        restored = ok_json(cli("image", "restore", image_id, "--server", server, "--json"))
        assert restored["content_sha256"] == manifest["content_sha256"]
        assert cli("vhd", "check", restored["disk"]).returncode == 0
        uuids.add(ok_json(cli("vhd", "info", restored["disk"], "--json"))["uuid"])
    assert len(uuids) == 3


def test_restore_to_a_given_path_prints_it(
    cli: Run, tmp_path: Path, image_of_leaf: dict[str, Any], qemu_img: str
) -> None:
    target = tmp_path / "restored" / "disk.vhd"
    result = cli("image", "restore", image_of_leaf["id"], "--server", "db1", "--disk", target)
    assert result.returncode == 0, result.stderr
    fields = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert fields["disk"].strip() == str(target)
    assert fields["content sha256"].strip() == f"{image_of_leaf['manifest']['content_sha256']} (verified)"
    raw = tmp_path / "image.raw"
    assert cli("image", "export", image_of_leaf["id"], raw, "--format", "raw").returncode == 0
    assert qemu_identical(qemu_img, target, raw).returncode == 0
    assert result.stderr == ""  # no progress bar off a terminal


def test_restore_refuses_an_existing_server_or_disk_and_a_layer_in_use(
    cli: Run, tmp_path: Path, leaf: Path, image_of_leaf: dict[str, Any]
) -> None:
    image_id = image_of_leaf["id"]
    lines = assert_one_line_error(cli("image", "restore", image_id, "--server", "web1"))
    assert "SERVER_EXISTS" in lines[0] and "web1" in lines[0]
    assert not (tmp_path / "data" / "store" / "sr" / "web1").joinpath("x").exists()

    existing = tmp_path / "precious.vhd"
    existing.write_bytes(b"keep me")
    lines = assert_one_line_error(cli("image", "restore", image_id, "--server", "web3", "--disk", existing))
    assert "already exists" in lines[0]
    assert "--force" not in "\n".join(lines)  # restore has none
    assert existing.read_bytes() == b"keep me"

    base = leaf.parent / "base.vhd"
    before = base.read_bytes()
    lines = assert_one_line_error(cli("image", "restore", image_id, "--server", "web3", "--disk", base))
    assert "layer of registered server web1" in lines[0]
    assert base.read_bytes() == before
    assert [s["id"] for s in ok_json(cli("server", "list", "--json"))] == ["web1"]
    assert (
        "another"
        in assert_one_line_error(cli("image", "restore", image_id, "--server", "web3", "--tenant", "another"))[0]
    )


def test_restore_of_a_damaged_image_registers_nothing_and_leaves_no_file(
    cli: Run, tmp_path: Path, image_of_leaf: dict[str, Any]
) -> None:
    image_id = image_of_leaf["id"]
    damage(stored_object(tmp_path, image_id))

    lines = assert_one_line_error(cli("image", "restore", image_id, "--server", "web2"))

    assert "IMAGE_CORRUPT" in lines[0] and image_id in lines[0] and "object offset" in lines[0]
    assert lines[1] == f"hint: run `imaging image verify {image_id}` to list every problem"
    assert len(lines) == 2
    assert "not found" in assert_one_line_error(cli("server", "show", "web2"))[0]
    assert list((tmp_path / "data" / "store" / "sr" / "web2").iterdir()) == []


def test_restore_checks_the_content_hash_before_registering(
    cli: Run, tmp_path: Path, image_of_leaf: dict[str, Any]
) -> None:
    """Frames intact but a manifest whose content hash is not the disk's: the restore's own check catches it."""
    image_id = image_of_leaf["id"]
    manifest_path = tmp_path / "data" / "store" / "images" / image_id / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["content_sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    target = tmp_path / "out" / "disk.vhd"

    lines = assert_one_line_error(cli("image", "restore", image_id, "--server", "web2", "--disk", target))

    assert "IMAGE_CORRUPT" in lines[0] and "content's sha256 differs" in lines[0]
    assert not target.exists() and list(target.parent.iterdir()) == []
    assert "not found" in assert_one_line_error(cli("server", "show", "web2"))[0]


def test_export_to_stdout_is_the_same_stream_as_the_files(
    cli: Run, tmp_path: Path, image_of_leaf: dict[str, Any], qemu_img: str, zstd_exe: str
) -> None:
    image_id = image_of_leaf["id"]
    for fmt in ("vhd.zst", "vhd", "raw"):
        assert cli("image", "export", image_id, tmp_path / f"file.{fmt}", "--format", fmt).returncode == 0

    piped = shell(tmp_path, f"imaging image export {image_id} - | {zstd_exe} -d -q > piped.vhd")
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == b""  # no progress bar off a terminal
    assert (tmp_path / "piped.vhd").read_bytes() == (tmp_path / "file.vhd").read_bytes()
    converted = tmp_path / "piped.raw"
    subprocess.run([qemu_img, "convert", "-f", "vpc", "-O", "raw", tmp_path / "piped.vhd", converted], check=True)
    assert converted.read_bytes() == (tmp_path / "file.raw").read_bytes()

    for fmt in ("vhd.zst", "vhd", "raw"):
        streamed = shell(tmp_path, f"imaging image export {image_id} - --format {fmt} | cat > stream.{fmt}")
        assert streamed.returncode == 0, streamed.stderr
        assert (tmp_path / f"stream.{fmt}").read_bytes() == (tmp_path / f"file.{fmt}").read_bytes(), fmt
    assert not (tmp_path / "-").exists()
    assert shell(tmp_path, f"imaging image export {image_id} - --json | cat").returncode == 2


def test_raw_export_to_a_pipe_is_the_disk_qemu_reads_from_the_image(
    cli: Run, tmp_path: Path, image_of_leaf: dict[str, Any], qemu_img: str
) -> None:
    """Raw to a pipe goes through vhdcore's sequential export (no seek); to a redirected file, through Python: both
    are the disk qemu-img reads from the image's VHD."""
    image_id = image_of_leaf["id"]
    assert cli("image", "export", image_id, tmp_path / "image.vhd", "--format", "vhd").returncode == 0
    reference = tmp_path / "qemu.raw"
    subprocess.run([qemu_img, "convert", "-f", "vpc", "-O", "raw", tmp_path / "image.vhd", reference], check=True)

    piped = shell(tmp_path, f"imaging image export {image_id} - --format raw | cmp - {shlex.quote(str(reference))}")
    assert piped.returncode == 0, piped.stdout + piped.stderr
    redirected = shell(tmp_path, f"imaging image export {image_id} - --format raw > redirected.raw")
    assert redirected.returncode == 0, redirected.stderr
    assert (tmp_path / "redirected.raw").read_bytes() == reference.read_bytes()


def test_export_of_a_damaged_image_is_one_error_line_and_no_file(
    cli: Run, tmp_path: Path, image_of_leaf: dict[str, Any]
) -> None:
    image_id = image_of_leaf["id"]
    damage(stored_object(tmp_path, image_id))
    for fmt in ("raw", "vhd", "vhd.zst"):
        out = tmp_path / f"damaged.{fmt}"
        lines = assert_one_line_error(cli("image", "export", image_id, out, "--format", fmt))
        assert lines[0].startswith(f"error: IMAGE_CORRUPT: image {image_id}: the "), lines
        assert "object offset" in lines[0] and ("fails its CRC32C" in lines[0] or "does not decompress" in lines[0])
        assert lines[1] == f"hint: run `imaging image verify {image_id}` to list every problem"
        assert len(lines) == 2
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("damaged")) == [], fmt
    piped = shell(tmp_path, f"imaging image export {image_id} - --format raw | cat > /dev/null")
    assert piped.returncode == 1
    assert b"IMAGE_CORRUPT" in piped.stderr and b"Traceback" not in piped.stderr


def test_a_frame_that_does_not_decompress_is_named_with_its_offset(
    cli: Run, tmp_path: Path, image_of_leaf: dict[str, Any]
) -> None:
    """A frame damaged in a way its CRC32C in the manifest agrees with (both rewritten): zstd's own check fails."""
    image_id, manifest = image_of_leaf["id"], image_of_leaf["manifest"]
    frame = max(manifest["frames"], key=lambda f: f["compressed_bytes"])
    damage_at = frame["offset"] + frame["compressed_bytes"] // 2
    stored = stored_object(tmp_path, image_id)
    data = bytearray(stored.read_bytes())
    data[damage_at : damage_at + 64] = bytes(64)
    stored.write_bytes(bytes(data))
    import crc32c

    frame_bytes = bytes(data[frame["offset"] : frame["offset"] + frame["compressed_bytes"]])
    manifest_path = tmp_path / "data" / "store" / "images" / image_id / "manifest.json"
    stored_manifest = json.loads(manifest_path.read_text())
    for item in stored_manifest["frames"]:
        if item["offset"] == frame["offset"]:
            item["crc32c"] = crc32c.crc32c(frame_bytes)
    manifest_path.write_text(json.dumps(stored_manifest))

    lines = assert_one_line_error(cli("image", "export", image_id, tmp_path / "out.vhd", "--format", "vhd"))

    assert f"chunk {frame['index']} at object offset {frame['offset']}" in lines[0]
    assert "does not decompress" in lines[0] and "zstd" in lines[0]


def test_export_or_restore_of_a_missing_image_says_so(cli: Run, tmp_path: Path) -> None:
    for argv in (["export", "img-nope", tmp_path / "x.vhd.zst"], ["restore", "img-nope", "--server", "web9"]):
        lines = assert_one_line_error(cli("image", *argv))
        assert lines[0] == "error: NO_SUCH_IMAGE: no such image: img-nope"
        assert lines[1] == "hint: list the images with `imaging image list`"
    assert not (tmp_path / "x.vhd.zst").exists()


def run_on_a_terminal(tmp_path: Path, argv: list[str]) -> tuple[int, str]:
    """Run `imaging ARGV` with stderr on a pseudo-terminal (stdout to a file); its exit code and what the terminal
    showed."""
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "IMAGING_DATA_DIR": str(tmp_path / "data"),
        "IMAGING_CHUNK_SIZE": str(8 * 1024**2),
        "COLUMNS": "120",
        "TERM": "xterm",
    }
    env.pop("NO_COLOR", None)
    master, slave = pty.openpty()
    with (tmp_path / "stdout").open("wb") as stdout:
        proc = subprocess.Popen(
            [*CLI, *argv], stdout=stdout, stderr=slave, stdin=subprocess.DEVNULL, cwd=tmp_path, env=env
        )
    os.close(slave)
    shown = bytearray()
    while True:
        ready, _, _ = select.select([master], [], [], 60)
        if not ready:
            proc.kill()
            break
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        shown += data
    os.close(master)
    return proc.wait(timeout=60), shown.decode(errors="replace")


def test_a_progress_bar_shows_on_a_terminal(cli: Run, tmp_path: Path, image_of_leaf: dict[str, Any]) -> None:
    image_id = image_of_leaf["id"]

    code, shown = run_on_a_terminal(tmp_path, ["image", "restore", image_id, "--server", "web2"])
    assert code == 0, shown
    assert "decompressing" in shown or "verifying" in shown, shown
    assert "\x1b[" in shown  # drawn with terminal control sequences

    code, shown = run_on_a_terminal(tmp_path, ["image", "export", image_id, "-", "--format", "raw"])
    assert code == 0, shown
    assert "flattening" in shown or "decompressing" in shown, shown
    assert (tmp_path / "stdout").stat().st_size == image_of_leaf["virtual_size"]
