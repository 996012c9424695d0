"""`imaging server ...` and `imaging image ...` end to end, as a user runs them: a child process on a file store and
SQLite under IMAGING_DATA_DIR, images checked with `zstd -d`, qemu-img and an independent flattener (pyvhd)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import crc32c

from functions.imaging.content import LEGACY_METHOD
from tests.support.cli import Run, assert_one_line_error, ok_json
from tests.support.files import content_tree_sha256
from tests.support.pyvhd import flatten
from tests.support.workflow import DISK_SIZE

MIB = 1024**2


def test_servers_are_registered_listed_and_shown(cli: Run, leaf: Path) -> None:
    added = ok_json(cli("server", "add", "web1", "--disk", leaf, "--flavor", "legacy", "--json"))
    assert (added["id"], added["disk"], added["flavor"], added["tenant"]) == ("web1", str(leaf), "legacy", "local")
    listed = ok_json(cli("server", "list", "--json"))
    assert [server["id"] for server in listed] == ["web1"]
    shown = ok_json(cli("server", "show", "web1", "--json"))
    assert (shown["lock"], shown["jobs"]) == (None, [])
    text = cli("server", "show", "web1")
    assert "being imaged: no" in text.stdout


def test_bad_servers_are_one_line_errors(cli: Run, tmp_path: Path, leaf: Path) -> None:
    assert "no such file" in assert_one_line_error(cli("server", "add", "web1", "--disk", tmp_path / "nope.vhd"))[0]
    assert "invalid server id" in assert_one_line_error(cli("server", "add", "../x", "--disk", leaf))[0]
    lines = assert_one_line_error(cli("server", "show", "ghost"))
    assert "server 'ghost' not found" in lines[0]
    assert lines[1].startswith("hint: ")


def test_a_disk_is_imaged_verified_exported_checked_for_damage_and_deleted(
    cli: Run, tmp_path: Path, leaf: Path
) -> None:
    expected = flatten(leaf)

    created = ok_json(cli("image", "create", "--disk", leaf, "--name", "nightly", "--json"))

    image_id = created["id"]
    assert (created["status"], created["name"], created["virtual_size"]) == ("ACTIVE", "nightly", DISK_SIZE)
    stored = Path(created["object_url"].removeprefix("file://"))
    assert stored == tmp_path / "data" / "store" / "images" / image_id / "image.vhd.zst"
    chunk_size = created["manifest"]["chunk_size"]
    assert created["manifest"]["content_sha256"] == content_tree_sha256(expected, chunk_size)
    stored_bytes = stored.read_bytes()
    assert created["manifest"]["object_layout"] == "in_place"  # written once, where it lives
    for part in created["manifest"]["parts"]:
        assert crc32c.crc32c(stored_bytes[part["offset"] : part["offset"] + part["length"]]) == part["crc32c"]
    assert sum(part["length"] for part in created["manifest"]["parts"]) == len(stored_bytes)

    listed = ok_json(cli("image", "list", "--json"))
    assert [(item["id"], item["status"]) for item in listed] == [(image_id, "ACTIVE")]
    shown = ok_json(cli("image", "show", image_id, "--json"))
    assert (shown["job"]["status"], shown["job"]["progress"]) == ("ACTIVE", 100)

    verified = ok_json(cli("image", "verify", image_id, "--json"))
    assert verified["ok"] is True
    assert verified["content_sha256"] == content_tree_sha256(expected, chunk_size)
    assert verified["frames_checked"] == 1 + DISK_SIZE // (8 * MIB)

    raw = tmp_path / "exported.raw"
    assert cli("image", "export", image_id, raw, "--format", "raw").returncode == 0
    assert raw.read_bytes() == expected
    packed = tmp_path / "exported.vhd.zst"
    assert cli("image", "export", image_id, packed).returncode == 0
    assert packed.read_bytes() == stored.read_bytes()
    vhd = tmp_path / "exported.vhd"
    assert cli("image", "export", image_id, vhd, "--format", "vhd").returncode == 0
    subprocess.run(["zstd", "-d", "-q", "-f", str(packed), "-o", str(tmp_path / "by-zstd.vhd")], check=True)
    assert vhd.read_bytes() == (tmp_path / "by-zstd.vhd").read_bytes()
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(vhd), str(tmp_path / "q.raw")], check=True)
    assert (tmp_path / "q.raw").read_bytes() == expected

    damaged = bytearray(stored.read_bytes())
    damaged[len(damaged) // 2] ^= 0xFF
    stored.write_bytes(bytes(damaged))
    found = cli("image", "verify", image_id)
    assert found.returncode == 1
    assert "CORRUPT" in found.stdout
    assert "problem: part" in found.stdout

    assert ok_json(cli("image", "delete", image_id, "--json")) == {"deleted": image_id}
    assert ok_json(cli("image", "list", "--json")) == []
    assert not stored.exists()
    assert "not found" in assert_one_line_error(cli("image", "show", image_id))[0]


def test_an_image_made_with_the_legacy_content_hash_is_verified_by_its_own_method(
    cli: Run, tmp_path: Path, leaf: Path
) -> None:
    """Manifests written before the 2 MiB slices hash each chunk whole; verify follows the method a manifest names."""
    expected = flatten(leaf)
    image_id = ok_json(cli("image", "create", "--disk", leaf, "--json"))["id"]
    manifest_path = tmp_path / "data" / "store" / "images" / image_id / "manifest.json"
    manifest = json.loads(manifest_path.read_bytes())
    chunk_size = manifest["chunk_size"]
    assert manifest["content_hash"] != LEGACY_METHOD
    legacy = [hashlib.sha256(expected[at : at + chunk_size]).hexdigest() for at in range(0, len(expected), chunk_size)]
    for frame in manifest["frames"]:
        if frame["index"] is not None:
            frame["content_sha256"] = legacy[frame["index"]]
    manifest["content_hash"] = LEGACY_METHOD
    manifest["content_sha256"] = hashlib.sha256(b"".join(bytes.fromhex(d) for d in legacy)).hexdigest()
    manifest_path.write_text(json.dumps(manifest))
    verified = ok_json(cli("image", "verify", image_id, "--json"))
    assert verified["ok"] is True, verified
    assert verified["content_sha256"] == manifest["content_sha256"]

    # A chunk's legacy digest altered is caught.
    next(f for f in manifest["frames"] if f["index"] == 0)["content_sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    result = cli("image", "verify", image_id, "--json")
    assert result.returncode == 1, result.stderr
    found = json.loads(result.stdout)
    assert any("chunk 0: the sha256 of its disk content differs" in p for p in found["problems"]), found


def test_create_with_wait_shows_progress_and_where_the_image_is(cli: Run, leaf: Path) -> None:
    result = cli("image", "create", "--disk", leaf, "--wait")

    assert result.returncode == 0, result.stderr
    assert "ACTIVE" in result.stderr and "100%" in result.stderr  # the progress bar's last state
    fields = dict(line.split(":", 1) for line in result.stdout.splitlines())
    assert fields["status"].strip() == "ACTIVE (100%)"
    assert fields["object"].strip().startswith("file://")
    assert {"coalesce (0%) took", "saving (25%) took", "uploading (50%) took"} <= set(fields)


def test_a_failed_job_is_one_error_line_with_its_hint(cli: Run, leaf: Path) -> None:
    assert cli("server", "add", "web1", "--disk", leaf).returncode == 0

    result = cli("image", "create", "web1", extra_env={"IMAGING_COALESCE_DEADLINE_S": "0"})

    lines = assert_one_line_error(result)
    assert "COALESCE_TIMEOUT" in lines[0]
    assert lines[1] == "hint: the chain could not be merged in time: wait and issue the image again"
    listed = ok_json(cli("image", "list", "--json"))
    assert [item["status"] for item in listed] == ["ERROR"]
    shown = cli("image", "show", listed[0]["id"])
    assert "error:    COALESCE_TIMEOUT" in shown.stdout


def test_usage_errors_exit_2(cli: Run, leaf: Path) -> None:
    assert cli("image", "create").returncode == 2
    assert cli("image", "create", "web1", "--disk", leaf).returncode == 2
