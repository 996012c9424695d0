"""The compressed image (issue 3): `zstd -d` then `qemu-img convert -f vpc -O raw` gives back exactly the flattened
chain, every chunk frame decompresses alone, and chunk plans run one by one from their reads give the same frames."""

from __future__ import annotations

import hashlib
import random
import shutil
import subprocess
from pathlib import Path

import crc32c as crc32c_reference  # independent implementation of CRC-32C
import pytest

import vhdcore
from tests.support.samples import Sample

MIB = 1024 * 1024


def zstd_decompress(data: bytes) -> bytes:
    return subprocess.run(["zstd", "-d", "-c", "-q"], input=data, capture_output=True, check=True).stdout


def qemu_flatten(vhd: Path, out: Path) -> bytes:
    subprocess.run(["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(vhd), str(out)], check=True)
    return out.read_bytes()


def text_bytes(rng: random.Random, n: int) -> bytes:
    words = [b"server", b"image", b"chain", b"block", b"kernel", b"\n", b"config=", b"42"]
    out = bytearray()
    while len(out) < n:
        out += rng.choice(words) + b" "
    return bytes(out[:n])


def mixed_bytes(rng: random.Random, n: int) -> bytes:
    kind = rng.choice(["text", "random", "zeros", "binary"])
    if kind == "text":
        return text_bytes(rng, n)
    if kind == "random":
        return rng.randbytes(n)
    if kind == "zeros":
        return bytes(n)
    return bytes(rng.choice([0, 0, 0x48, 0x89, 0xE8, 0xFF, rng.randrange(256)]) for _ in range(n))


def build_chain(folder: Path, seed: int, size: int, depth: int, base_type: str, block_size: int) -> Path:
    rng = random.Random(seed)
    base = folder / "layer0.vhd"
    vhdcore.create(str(base), size, base_type, block_size)  # type: ignore[arg-type]
    leaf = base
    for level in range(depth):
        for _ in range(6):
            length = rng.choice([512, 4096, 100_000, 2 * MIB, 3 * MIB + 17])
            offset = rng.randrange(0, size - length)
            vhdcore.write(str(leaf), offset, mixed_bytes(rng, length))
        if level + 1 < depth:
            child = folder / f"layer{level + 1}.vhd"
            vhdcore.snapshot(str(leaf), str(child))
            leaf = child
    return leaf


CHAINS = [
    pytest.param(11, 24 * MIB, 3, "dynamic", 2 * MIB, id="depth3-dynamic"),
    pytest.param(12, 20 * MIB + 1536, 4, "fixed", 512 * 1024, id="depth4-fixed-base-odd-size"),
    pytest.param(13, 9 * MIB, 1, "dynamic", 4 * MIB, id="single-4mib-blocks"),
]


@pytest.fixture(scope="module")
def tools() -> None:
    for tool in ("zstd", "qemu-img"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} not found: run .ci/setup")


def assert_image_is_the_chain(image: Path, chain: vhdcore.Chain, tmp: Path) -> None:
    vhd = tmp / "decompressed.vhd"
    vhd.write_bytes(zstd_decompress(image.read_bytes()))
    assert qemu_flatten(vhd, tmp / "qemu.raw") == chain.read(0, chain.virtual_size)


@pytest.mark.usefixtures("tools")
@pytest.mark.parametrize(("seed", "size", "depth", "base_type", "block_size"), CHAINS)
def test_image_decompresses_to_the_flattened_chain(
    tmp_path: Path, seed: int, size: int, depth: int, base_type: str, block_size: int
) -> None:
    leaf = build_chain(tmp_path, seed, size, depth, base_type, block_size)
    chain = vhdcore.open_chain(str(leaf))
    image = tmp_path / "image.vhd.zst"
    stats = chain.compress(str(image), level=3, chunk_size=4 * MIB)
    assert stats.compressed_bytes == image.stat().st_size
    assert_image_is_the_chain(image, chain, tmp_path)
    # Every chunk's frame is independent: it decompresses alone to bytes whose sha256 the stats give.
    data = image.read_bytes()
    for frame in [stats.head, *stats.chunks]:
        assert frame.object_offset is not None
        alone = zstd_decompress(data[frame.object_offset : frame.object_offset + frame.compressed_bytes])
        assert len(alone) == frame.logical_bytes
        assert hashlib.sha256(alone).hexdigest() == frame.sha256
        assert frame.crc32c == crc32c_reference.crc32c(
            data[frame.object_offset : frame.object_offset + frame.compressed_bytes]
        )


@pytest.mark.usefixtures("tools")
def test_xo_sample_image(tmp_path: Path, xo_chain3: Sample) -> None:
    chain = vhdcore.open_chain(str(xo_chain3.leaf))
    image = tmp_path / "xo.vhd.zst"
    chain.compress(str(image))
    assert_image_is_the_chain(image, chain, tmp_path)
    vhd = tmp_path / "decompressed.vhd"
    expected = xo_chain3.expected["sha256_raw"]
    assert hashlib.sha256(qemu_flatten(vhd, tmp_path / "again.raw")).hexdigest() == expected


@pytest.mark.usefixtures("tools")
@pytest.mark.parametrize(("seed", "size", "depth", "base_type", "block_size"), CHAINS)
def test_chunk_plans_run_one_by_one_give_the_all_in_one_bytes(
    tmp_path: Path, seed: int, size: int, depth: int, base_type: str, block_size: int
) -> None:
    leaf = build_chain(tmp_path, seed, size, depth, base_type, block_size)
    chain = vhdcore.open_chain(str(leaf))
    whole = tmp_path / "whole.vhd.zst"
    chain.compress(str(whole), chunk_size=4 * MIB)
    # A worker sees only the plan (as JSON) and the bytes of its reads, fetched here with plain file reads.
    plan = vhdcore.ImagePlan.from_json(chain.plan(4 * MIB).to_json())
    frames = []
    for chunk in plan.chunks:
        reads = []
        for read in chunk.reads:
            with open(plan.layer_paths[read.layer], "rb") as f:
                f.seek(read.file_offset)
                reads.append(f.read(read.length))
        frame = vhdcore.compress_fetched_chunk(plan, chunk.index, reads)
        assert frame.frame == chain.compress_chunk(plan, chunk.index).frame
        frames.append(frame)
    head = vhdcore.compress_head(plan, [(f.stored_blocks, f.logical_bytes) for f in frames])
    assembled = tmp_path / "assembled.vhd.zst"
    assembled.write_bytes(head.frame + b"".join(f.frame for f in frames))
    assert_image_is_the_chain(assembled, chain, tmp_path)
    # The same disk blocks as the all-in-one image (the footers differ: each plan names a new image uuid).
    whole_vhd = tmp_path / "whole.vhd"
    whole_vhd.write_bytes(zstd_decompress(whole.read_bytes()))
    assert qemu_flatten(whole_vhd, tmp_path / "whole.raw") == chain.read(0, chain.virtual_size)


def test_plans_read_only_metadata_named_blocks(tmp_path: Path) -> None:
    leaf = build_chain(tmp_path, 21, 16 * MIB, 2, "dynamic", 2 * MIB)
    chain = vhdcore.open_chain(str(leaf))
    plan = chain.plan(4 * MIB)
    assert [c.start for c in plan.chunks] == list(range(0, 16 * MIB, 4 * MIB))
    extents = chain.map()
    for chunk in plan.chunks:
        end = chunk.start + chunk.length
        # The unallocated ranges are exactly the chunk's parts the map shows no layer holding.
        expected = []
        for e in extents:
            s, t = max(e.start, chunk.start), min(e.start + e.length, end)
            if s < t and e.layer is None:
                if expected and expected[-1][0] + expected[-1][1] == s:
                    expected[-1] = (expected[-1][0], expected[-1][1] + t - s)
                else:
                    expected.append((s, t - s))
        assert_covers_map_zeros(chunk.unallocated, expected)
        for read in chunk.reads:
            assert read.length == read.blocks * (512 + 2 * MIB)


def assert_covers_map_zeros(unallocated: list[tuple[int, int]], map_zeros: list[tuple[int, int]]) -> None:
    """Unallocated (from BATs) is a subset of what the map calls zero (the map also sees bitmaps)."""
    for start, length in unallocated:
        assert any(s <= start and start + length <= s + n for s, n in map_zeros), (start, length)


def test_a_plan_from_elsewhere_is_validated() -> None:
    with pytest.raises(vhdcore.InvalidArgumentError):
        vhdcore.ImagePlan.from_json('{"virtual_size": 1}')


def noise_and_text(rng: random.Random, pieces: int, piece: int) -> bytes:
    """Alternating runs of random bytes (what compressed or encrypted files look like) and text."""
    out = bytearray()
    for i in range(pieces):
        out += rng.randbytes(piece) if i % 2 == 0 else text_bytes(rng, piece)
    return bytes(out)


@pytest.mark.usefixtures("tools")
@pytest.mark.parametrize("level", [3, 6, -1])  # early abort at the default level and a higher one; none at a fast one
def test_incompressible_data_is_stored_raw_and_mixed_chunks_stay_within_one_percent_of_zstd(
    tmp_path: Path, level: int
) -> None:
    rng = random.Random(31)
    size = 24 * MIB
    base = tmp_path / "base.vhd"
    vhdcore.create(str(base), size, "dynamic", 2 * MIB)
    vhdcore.write(str(base), 0, rng.randbytes(8 * MIB))  # chunk 0: all noise
    vhdcore.write(str(base), 8 * MIB, noise_and_text(rng, 32, 256 * 1024))  # chunk 1: 256 KiB runs
    vhdcore.write(str(base), 16 * MIB, noise_and_text(rng, 2048, 4096))  # chunk 2: 4 KiB runs
    snap = tmp_path / "snap.vhd"
    vhdcore.snapshot(str(base), str(snap))
    vhdcore.write(str(snap), 3 * MIB + 512, rng.randbytes(100_000))  # a noisy rewrite in a child layer
    chain = vhdcore.open_chain(str(snap))
    image = tmp_path / "image.vhd.zst"
    stats = chain.compress(str(image), level=level, chunk_size=8 * MIB)
    assert_image_is_the_chain(image, chain, tmp_path)
    data = image.read_bytes()
    noisy = stats.chunks[0]
    # Raw blocks: the bytes, a 3-byte header per 128 KiB block, the frame's header and checksum.
    assert noisy.compressed_bytes <= noisy.logical_bytes + 3 * -(-noisy.logical_bytes // (128 * 1024)) + 32
    for chunk in stats.chunks[1:]:
        assert chunk.object_offset is not None
        logical = zstd_decompress(data[chunk.object_offset : chunk.object_offset + chunk.compressed_bytes])
        reference = subprocess.run(
            ["zstd", f"-{level}" if level > 0 else f"--fast={-level}", "-c", "-q"],
            input=logical,
            capture_output=True,
            check=True,
        ).stdout
        assert chunk.compressed_bytes <= 1.01 * len(reference), (chunk.index, chunk.compressed_bytes, len(reference))
