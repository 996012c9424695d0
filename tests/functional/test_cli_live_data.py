"""Filesystem-aware imaging through the CLI, as a user runs it (DESIGN §5 "Live data only", §7b): disks built with
e2fsprogs over random bytes (so free space holds deleted data) and sfdisk, written into VHDs by qemu-img; the image,
through `zstd -d` and `qemu-img convert -f vpc -O raw`, must be the disk with only proven-free ranges zeroed: the
same partition table, a filesystem `e2fsck -fn` calls clean and every file identical; `--all-blocks` gives the disk
itself; a disk nothing can be proven of is imaged whole."""

from __future__ import annotations

import random
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.cli import Run, ok_json

MIB = 1024**2
PART_START = MIB
TOOLS = ("mkfs.ext4", "debugfs", "e2fsck", "dumpe2fs", "sfdisk", "qemu-img", "zstd")

pytestmark = pytest.mark.skipif(
    any(shutil.which(tool) is None and not Path("/usr/sbin", tool).exists() for tool in TOOLS),
    reason=f"needs {', '.join(TOOLS)} (.ci/setup installs them)",
)


def tool(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


def run(*args: str | Path, stdin: bytes | None = None) -> str:
    result = subprocess.run([tool(str(args[0])), *map(str, args[1:])], capture_output=True, input=stdin, check=False)
    assert result.returncode == 0, (args, result.stdout, result.stderr)
    return result.stdout.decode(errors="replace")


def random_file(path: Path, size: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("wb") as out:
        for _ in range(size // MIB):
            out.write(rng.randbytes(MIB))


def make_files(src: Path, seed: int, count: int, max_len: int) -> dict[str, bytes]:
    rng = random.Random(seed)
    src.mkdir(parents=True)
    files = {}
    for i in range(count):
        data = rng.randbytes(1 + rng.randrange(max_len))
        (src / f"f{i:03}.bin").write_bytes(data)
        files[f"f{i:03}.bin"] = data
    return files


def build_ext4(fs: Path, size: int, src: Path, files: dict[str, bytes], delete: list[str]) -> None:
    random_file(fs, size, 7)
    run("mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "nodiscard", "-d", src, fs)
    if delete:
        script = fs.with_suffix(".rm")
        script.write_text("".join(f"rm /{name}\n" for name in delete))
        run("debugfs", "-w", "-f", script, fs)


def disk_with_partition(work: Path, fs: Path) -> Path:
    """A disk of random bytes with an MBR whose one partition (type 83, at 1 MiB) holds `fs`."""
    disk = work / "disk.raw"
    fs_size = fs.stat().st_size
    random_file(disk, PART_START + fs_size + MIB, 11)
    with disk.open("r+b") as out:
        out.seek(PART_START)
        out.write(fs.read_bytes())
    run("sfdisk", "-q", disk, stdin=f"label: dos\nstart=2048, size={fs_size // 512}, type=83\n".encode())
    return disk


def to_vhd(raw: Path) -> Path:
    vhd = raw.with_suffix(".vhd")
    run("qemu-img", "convert", "-f", "raw", "-O", "vpc", "-o", "subformat=dynamic,force_size=on", raw, vhd)
    return vhd


def image_of(cli: Run, disk: Path, *extra: str) -> dict[str, Any]:
    created = ok_json(cli("image", "create", "--disk", disk, "--wait", "--json", *extra))
    assert created["status"] == "ACTIVE"
    return dict(created)


def restored(created: dict[str, Any], out: Path) -> Path:
    """The image's disk through the standard tools: `zstd -d`, then `qemu-img convert -f vpc -O raw`."""
    url = created["object_url"]
    assert url.startswith("file://")
    vhd = out.with_suffix(".vhd")
    run("zstd", "-q", "-d", "-f", url.removeprefix("file://"), "-o", vhd)
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", vhd, out)
    return out


def partition(disk: Path, out: Path, size: int) -> Path:
    with disk.open("rb") as f:
        f.seek(PART_START)
        out.write_bytes(f.read(size))
    return out


def assert_files(fs: Path, files: dict[str, bytes], scratch: Path) -> None:
    scratch.mkdir(exist_ok=True)
    script = scratch / "dump.cmds"
    script.write_text("".join(f"dump /{name} {scratch / name}\n" for name in files))
    run("debugfs", "-f", script, fs)
    for name, data in files.items():
        assert (scratch / name).read_bytes() == data, f"{name} differs after the restore"


def manifest_of(created: dict[str, Any]) -> dict[str, Any]:
    manifest = created.get("manifest") or {}
    return dict(manifest)


def test_an_ext4_disk_is_imaged_live_smaller_and_restores_every_file(cli: Run, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = make_files(src, 3, 30, 1_500_000)
    deleted = [name for i, name in enumerate(sorted(files)) if i % 3 != 0]
    fs = tmp_path / "fs.img"
    fs_size = 48 * MIB
    build_ext4(fs, fs_size, src, files, deleted)
    live_files = {name: data for name, data in files.items() if name not in deleted}
    disk = to_vhd(disk_with_partition(tmp_path, fs))
    source = tmp_path / "disk.raw"

    usage = ok_json(cli("vhd", "usage", disk, "--json"))
    assert usage["table"] == "mbr"
    (part,) = usage["partitions"]
    assert (part["filesystem"], part["decision"], part["start"]) == ("ext4", "dropped", PART_START)
    assert usage["free_bytes"] > 20 * MIB and usage["kept_whole"] == []
    text = cli("vhd", "usage", disk)
    assert text.returncode == 0 and "leaves out" in text.stdout and "ext4" in text.stdout

    live = image_of(cli, disk)
    whole = image_of(cli, disk, "--all-blocks")
    live_size, whole_size = live["compressed_size"], whole["compressed_size"]
    assert live_size < whole_size / 2, (live_size, whole_size)

    # --all-blocks: today's image, the disk byte for byte.
    assert restored(whole, tmp_path / "whole.raw").read_bytes() == source.read_bytes()

    # Live: the same partition table, a clean filesystem, every file identical; only free ranges differ.
    back = restored(live, tmp_path / "live.raw")
    got, want = back.read_bytes(), source.read_bytes()
    assert len(got) == len(want)
    assert got[:PART_START] == want[:PART_START], "the MBR and the gap before the partition must be kept"
    assert run("sfdisk", "-d", back).replace(str(back), "D") == run("sfdisk", "-d", source).replace(str(source), "D")
    assert got[PART_START + fs_size :] == want[PART_START + fs_size :], "the area past the partition is kept"
    for start, length in usage["free"]:
        assert got[start : start + length] == bytes(length)
    fs_back = partition(back, tmp_path / "fs.back", fs_size)
    run("e2fsck", "-fn", fs_back)
    assert_files(fs_back, live_files, tmp_path / "dump")

    # The manifest records the mode and the partition; show says what was left out; verify checks what was stored.
    recorded = manifest_of(live)["live_data"]
    assert recorded["mode"] == "live" and recorded["dropped_bytes"] == usage["free_bytes"]
    (entry,) = recorded["partitions"]
    assert entry["type"] == "mbr:0x83" and entry["filesystem"] == "ext4" and entry["size"] == fs_size
    assert entry["dropped_bytes"] + entry["used_bytes"] == fs_size and entry["reason"] is None
    assert manifest_of(whole)["live_data"]["mode"] == "all_blocks"
    shown = cli("image", "show", live["id"])
    assert shown.returncode == 0 and "left out" in shown.stdout, shown.stdout
    for image in (live, whole):
        verified = cli("image", "verify", image["id"])
        assert verified.returncode == 0, verified.stderr


def test_a_disk_without_a_known_filesystem_is_imaged_whole(cli: Run, tmp_path: Path) -> None:
    raw = tmp_path / "noise.raw"
    random_file(raw, 12 * MIB, 5)
    disk = to_vhd(raw)
    usage = ok_json(cli("vhd", "usage", disk, "--json"))
    assert usage["free_bytes"] == 0 and usage["kept_whole"][0]["filesystem"] == "unknown"
    created = image_of(cli, disk)
    assert restored(created, tmp_path / "back.raw").read_bytes() == raw.read_bytes()
    recorded = manifest_of(created)["live_data"]
    assert recorded["mode"] == "live" and recorded["dropped_bytes"] == 0
    assert recorded["partitions"][0]["decision"] == "keep_whole" and recorded["partitions"][0]["reason"]


def meta_blocks(fs: Path) -> list[int]:
    """Superblock, group descriptor and bitmap blocks, from dumpe2fs."""
    blocks: set[int] = set()
    for line in run("dumpe2fs", fs).splitlines():
        text = line.strip()
        if text.startswith("Primary superblock at "):
            rest = text.removeprefix("Primary superblock at ")
            blocks.add(int(rest.split(",")[0]))
            if "Group descriptors at " in rest:
                first, _, last = rest.split("Group descriptors at ")[1].partition("-")
                blocks.update(range(int(first), int(last or first) + 1))
        for key in ("Block bitmap at ", "Inode bitmap at "):
            if text.startswith(key):
                blocks.add(int(text.removeprefix(key).split()[0]))
    return sorted(blocks)


def read_blocks(fs: Path, blocks: list[int]) -> list[bytes]:
    with fs.open("rb") as f:
        out = []
        for block in blocks:
            f.seek(block * 4096)
            out.append(f.read(4096))
        return out


def test_a_file_committed_only_in_the_journal_survives_replay(cli: Run, tmp_path: Path) -> None:
    """The snapshot of a mounted ext4: a new file's blocks are allocated only in a committed jbd2 transaction, the
    on-disk bitmaps do not have them. After the restored filesystem's journal is replayed, not a byte is lost."""
    src = tmp_path / "src"
    files = make_files(src, 9, 8, 600_000)
    fs = tmp_path / "fs.img"
    build_ext4(fs, 32 * MIB, src, files, ["f001.bin", "f004.bin"])
    for name in ("f001.bin", "f004.bin"):
        del files[name]
    meta = meta_blocks(fs)
    before = read_blocks(fs, meta)
    new = random.Random(4).randbytes(3 * MIB + 123)
    host = tmp_path / "new.bin"
    host.write_bytes(new)
    (tmp_path / "write.cmds").write_text(f"write {host} new.bin\n")
    run("debugfs", "-w", "-f", tmp_path / "write.cmds", fs)
    after = read_blocks(fs, meta)
    changed = [i for i in range(len(meta)) if before[i] != after[i]]
    assert changed
    payload = tmp_path / "txn.bin"
    payload.write_bytes(b"".join(after[i] for i in changed))
    # The metadata goes back to before the write; the change lives only in a committed journal transaction.
    with fs.open("r+b") as f:
        for i in changed:
            f.seek(meta[i] * 4096)
            f.write(before[i])
    blocks = ",".join(str(meta[i]) for i in changed)
    (tmp_path / "journal.cmds").write_text(f"jo\njw -b {blocks} {payload}\njc\n")
    run("debugfs", "-w", "-f", tmp_path / "journal.cmds", fs)
    assert "needs_recovery" in run("dumpe2fs", "-h", fs)
    files["new.bin"] = new
    disk = to_vhd(fs)

    created = image_of(cli, disk)
    assert manifest_of(created)["live_data"]["dropped_bytes"] > 0
    back = restored(created, tmp_path / "back.raw")
    replay = subprocess.run([tool("e2fsck"), "-fy", "-E", "journal_only", str(back)], capture_output=True, check=False)
    assert replay.returncode <= 1, replay.stderr
    run("e2fsck", "-fn", back)
    assert_files(back, files, tmp_path / "dump")


def test_a_server_set_to_all_blocks_is_imaged_whole(cli: Run, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = make_files(src, 5, 10, 800_000)
    fs = tmp_path / "fs.img"
    build_ext4(fs, 24 * MIB, src, files, ["f002.bin", "f003.bin", "f005.bin"])
    disk = to_vhd(fs)
    added = ok_json(cli("server", "add", "web", "--disk", disk, "--all-blocks", "--json"))
    assert added["all_blocks"] is True
    shown = cli("server", "show", "web")
    assert shown.returncode == 0 and "every block" in shown.stdout, shown.stdout
    created = ok_json(cli("image", "create", "web", "--wait", "--json"))
    assert manifest_of(created)["live_data"]["mode"] == "all_blocks"
    # The server's disk went on to a new leaf after the snapshot; the image is the disk as it was.
    assert restored(created, tmp_path / "back.raw").read_bytes() == fs.read_bytes()


def test_vhd_export_live_only_zeroes_what_is_proven_free(cli: Run, tmp_path: Path) -> None:
    src = tmp_path / "src"
    files = make_files(src, 8, 12, 900_000)
    fs = tmp_path / "fs.img"
    build_ext4(fs, 24 * MIB, src, files, ["f001.bin", "f002.bin", "f007.bin"])
    disk = to_vhd(fs)
    usage = ok_json(cli("vhd", "usage", disk, "--json"))
    expected = bytearray(fs.read_bytes())
    for start, length in usage["free"]:
        expected[start : start + length] = bytes(length)
    for fmt in ("raw", "vhd", "vhd.zst"):
        out = tmp_path / f"live.{fmt}"
        ok_json(cli("vhd", "export", disk, out, "--format", fmt, "--live-only", "--json"))
        if fmt == "raw":
            assert out.read_bytes() == bytes(expected)
            continue
        vhd = out
        if fmt == "vhd.zst":
            vhd = tmp_path / "unpacked.vhd"
            run("zstd", "-q", "-d", "-f", out, "-o", vhd)
        back = tmp_path / f"back-{fmt}.raw"
        run("qemu-img", "convert", "-f", "vpc", "-O", "raw", vhd, back)
        assert back.read_bytes() == bytes(expected), fmt
    whole = tmp_path / "all.raw"
    ok_json(cli("vhd", "export", disk, whole, "--json"))
    assert whole.read_bytes() == fs.read_bytes()


def test_a_live_image_made_through_staged_frames_and_a_multipart_upload(cli: Run, tmp_path: Path) -> None:
    """As on S3: several Map items build their chunks from the staged plan's JSON (its free ranges with it)."""
    src = tmp_path / "src"
    files = make_files(src, 6, 20, 1_000_000)
    fs = tmp_path / "fs.img"
    build_ext4(fs, 40 * MIB, src, files, [name for i, name in enumerate(sorted(files)) if i % 2])
    disk = to_vhd(fs)
    usage = ok_json(cli("vhd", "usage", disk, "--json"))
    expected = bytearray(fs.read_bytes())
    for start, length in usage["free"]:
        expected[start : start + length] = bytes(length)
    staged = {"IMAGING_OBJECT_LAYOUT": "staged"}
    created = ok_json(cli("image", "create", "--disk", disk, "--wait", "--json", extra_env=staged))
    assert manifest_of(created)["object_layout"] == "staged"
    assert restored(created, tmp_path / "back.raw").read_bytes() == bytes(expected)
    assert cli("image", "verify", created["id"], extra_env=staged).returncode == 0
