#!/usr/bin/env python3
"""Benchmarks of vhdcore against its peers, in one run on the same files (DESIGN §8, issue 2).

    python bench/bench_vhd.py [--size-gib 2] [--workdir DIR] [--json]

1. Builds (seeded, cached in the work directory under a key of every parameter) a depth-3 chain of realistic mixed
   data written through vhdcore.create/snapshot/write, and a depth-30 chain of the largest VHD size.
2. Export throughput of the depth-3 chain (raw to /dev/null, raw to a file, vhd to a file) against `cat` of the
   chain's files to /dev/null, page cache warm, best of N.
3. Export of the base layer alone (a dynamic VHD) to raw against `qemu-img convert -f vpc -O raw`.
4. open_chain and map() of the depth-30 chain, best of N.

Prints a markdown table (or JSON with --json) and the machine it ran on. Progress goes to stderr.
See bench/README.md for what each row means.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

try:
    import vhdcore
except ImportError as exc:  # pragma: no cover - depends on the environment
    sys.exit(f"error: cannot import vhdcore ({exc}); install the project first: pip install . (from the repo root)")

GENERATOR_VERSION = 2
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
BLOCK = 2 * MiB  # vhdcore.DEFAULT_BLOCK_SIZE; every disk here uses it
SECTOR = 512
MB = 1_000_000  # throughputs are in MB/s = 10^6 bytes per second
WRITE_CHUNK = 4 * MiB

# Mix of the data written into allocated space: (kind, weight).
DATA_MIX = (("zeros", 0.15), ("text", 0.25), ("elf", 0.25), ("compressed", 0.15), ("random", 0.20))

TEXT_POOL_CAP = 48 * MiB
ELF_POOL_CAP = 96 * MiB
COMPRESSED_POOL_CAP = 32 * MiB
POOL_FILE_CAP = 8 * MiB  # at most this much of any one file


_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[bench {time.perf_counter() - _T0:6.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------------
# Data: pools of real bytes from this machine, sliced by a seeded generator.
# --------------------------------------------------------------------------------------------------------------------


def _walk_files(roots: list[Path], accept: Callable[[Path], bool]) -> Iterator[Path]:
    seen: set[Path] = set()
    for root in roots:
        if not root.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames.sort()
            for name in sorted(filenames):
                path = Path(dirpath) / name
                try:
                    if path.is_symlink() or not path.is_file():
                        continue
                    real = path.resolve()
                except OSError:
                    continue
                if real in seen or not accept(path):
                    continue
                seen.add(real)
                yield path


def _fill_pool(files: Iterator[Path], cap: int, check: Callable[[bytes], bool], used: list[tuple[str, int]]) -> bytes:
    parts: list[bytes] = []
    total = 0
    # Byte-identical copies (Debian ships the same changelog.gz, NEWS.gz, wheels under several package names, walked
    # one after the other) would put a file and its copy within a few hundred KiB of each other in the pool: 13 of
    # the 32 MiB of "already-compressed" bytes were such copies, which zstd -3 then packs 1.3-5x. Keep one of each.
    contents: set[bytes] = set()
    for path in files:
        try:
            with open(path, "rb") as f:
                head = f.read(4 * KiB)
                if len(head) < 4 * KiB or not check(head):
                    continue
                data = (head + f.read(max(0, min(POOL_FILE_CAP, cap - total) - len(head))))[: cap - total]
        except OSError:
            continue
        digest = hashlib.sha256(data).digest()
        if digest in contents:
            continue
        contents.add(digest)
        parts.append(data)
        used.append((str(path), len(data)))
        total += len(data)
        if total >= cap:
            break
    return b"".join(parts)


def _is_text(head: bytes) -> bool:
    if b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 4  # a character cut at the end of the sample is fine
    return True


@dataclass
class Corpus:
    text: bytes
    elf: bytes
    compressed: bytes
    fingerprint: str
    sources: dict[str, int]

    @classmethod
    def load(cls) -> Corpus:
        used: list[tuple[str, int]] = []
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        text_roots = [Path("/usr/share/common-licenses"), Path("/usr/share/doc"), stdlib, Path("/usr/include")]
        text = _fill_pool(
            _walk_files(text_roots, lambda p: p.suffix in {"", ".py", ".txt", ".h", ".rst", ".md"}),
            TEXT_POOL_CAP,
            _is_text,
            used,
        )
        lib = Path(sysconfig.get_config_var("LIBDIR") or "/usr/lib")
        elf_roots = [Path("/usr/bin"), Path("/usr/sbin"), Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/lib"), lib]
        elf = _fill_pool(_walk_files(elf_roots, lambda p: True), ELF_POOL_CAP, lambda d: d[:4] == b"\x7fELF", used)
        comp_suffixes = {".gz", ".xz", ".zst", ".bz2", ".lz4", ".zip", ".jpg", ".png", ".whl"}
        compressed = _fill_pool(
            _walk_files([Path("/usr/share"), Path("/usr/lib")], lambda p: p.suffix in comp_suffixes),
            COMPRESSED_POOL_CAP,
            lambda d: True,
            used,
        )
        rng = random.Random(0x5EED)
        if len(text) < MiB:  # a bare container: synthesize words
            words = [
                bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(4096)
            ]
            text = b" ".join(rng.choice(words) for _ in range(2 * MiB // 5))
        if len(elf) < MiB:  # machine code look-alike: random bytes with runs of zeros
            elf = b"".join(rng.randbytes(rng.randint(16, 256)) + bytes(rng.randint(0, 64)) for _ in range(32 * KiB))
        # Top the compressed pool up with deflate output of the other pools (what packed files on a disk look like).
        extra: list[bytes] = []
        total = len(compressed)
        src = text + elf
        pos = 0
        while total < COMPRESSED_POOL_CAP // 2 and src:
            piece = zlib.compress(src[pos : pos + 4 * MiB], 6)
            extra.append(piece)
            total += len(piece)
            pos = (pos + 4 * MiB) % max(len(src) - 4 * MiB, 1)
        compressed += b"".join(extra)
        digest = hashlib.sha256()
        for path, size in used:
            digest.update(f"{path}\0{size}\n".encode())
        digest.update(f"{len(text)} {len(elf)} {len(compressed)}".encode())
        return cls(
            text=text,
            elf=elf,
            compressed=compressed,
            fingerprint=digest.hexdigest()[:16],
            sources={"files": len(used), "text": len(text), "elf": len(elf), "compressed": len(compressed)},
        )


class DataGen:
    """Seeded mixed data: zeros, text, ELF, already-compressed and random bytes, in segments of 4 KiB to 1 MiB."""

    def __init__(self, corpus: Corpus, rng: random.Random) -> None:
        self.corpus = corpus
        self.rng = rng
        self.kinds = [k for k, _ in DATA_MIX]
        self.weights = [w for _, w in DATA_MIX]

    def _slice(self, pool: bytes, n: int) -> bytes:
        if n >= len(pool):
            return (pool * (n // len(pool) + 1))[:n]
        at = self.rng.randrange(0, len(pool) - n)
        return pool[at : at + n]

    def segment(self, kind: str, n: int) -> bytes:
        if kind == "zeros":
            return bytes(n)
        if kind == "random":
            return self.rng.randbytes(n)
        pool = {"text": self.corpus.text, "elf": self.corpus.elf, "compressed": self.corpus.compressed}[kind]
        return self._slice(pool, n)

    def fill(self, n: int) -> bytes:
        parts: list[bytes] = []
        left = n
        while left > 0:
            kind = self.rng.choices(self.kinds, self.weights)[0]
            seg = 4 * KiB * int(2 ** self.rng.uniform(0, 8))  # 4 KiB .. 1 MiB, log-uniform
            seg = min(seg, left)
            parts.append(self.segment(kind, seg))
            left -= seg
        return b"".join(parts)


# --------------------------------------------------------------------------------------------------------------------
# The depth-3 chain and the depth-30 chain, cached by parameters.
# --------------------------------------------------------------------------------------------------------------------


def _cache_dir(workdir: Path, prefix: str, params: dict[str, Any]) -> Path:
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:12]
    return workdir / f"{prefix}-{key}"


def _load_cached(directory: Path, params: dict[str, Any]) -> dict[str, Any] | None:
    meta = directory / "meta.json"
    if not meta.is_file():
        return None
    try:
        info: dict[str, Any] = json.loads(meta.read_text())
    except ValueError:
        return None
    if info.get("params") != params:
        return None
    if not all((directory / name).is_file() for name in info.get("files", [])):
        return None
    return info


def _fresh_dir(directory: Path) -> None:
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)


def _write_run(path: Path, offset: int, data: bytes) -> None:
    for at in range(0, len(data), WRITE_CHUNK):
        vhdcore.write(str(path), offset + at, data[at : at + WRITE_CHUNK])


def build_chain3(workdir: Path, size: int, seed: int, corpus: Corpus) -> dict[str, Any]:
    """Base dynamic VHD (~60% of blocks allocated, mixed data) and two differencing layers rewriting ~10% each."""
    params: dict[str, Any] = {
        "kind": "chain3",
        "version": GENERATOR_VERSION,
        "size": size,
        "seed": seed,
        "allocated": 0.60,
        "rewrite": 0.10,
        "mix": DATA_MIX,
        "corpus": corpus.fingerprint,
    }
    params = json.loads(json.dumps(params))  # tuples -> lists, as read back from meta.json
    directory = _cache_dir(workdir, "chain3", params)
    cached = _load_cached(directory, params)
    if cached is not None:
        log(f"depth-3 chain: cached in {directory}")
        cached["dir"] = str(directory)
        cached["cached"] = True
        return cached
    log(f"depth-3 chain: building {size / GiB:g} GiB in {directory}")
    started = time.perf_counter()
    _fresh_dir(directory)
    rng = random.Random(seed)
    gen = DataGen(corpus, rng)
    nblocks = size // BLOCK
    names = ["base.vhd", "snap1.vhd", "snap2.vhd"]
    base = directory / names[0]
    vhdcore.create(str(base), size)
    # Allocation comes in runs of 1..24 blocks, like a file system's; each run is allocated with p = 0.6.
    pos = 0
    while pos < nblocks:
        run = min(rng.randint(1, 24), nblocks - pos)
        if rng.random() < params["allocated"]:
            # 5% of the runs: freed space that was zeroed (allocated, all zeros).
            data = bytes(run * BLOCK) if rng.random() < 0.05 else gen.fill(run * BLOCK)
            _write_run(base, pos * BLOCK, data)
        pos += run
    parent = base
    for name in names[1:]:
        layer = directory / name
        vhdcore.snapshot(str(parent), str(layer))
        quota = int(size * params["rewrite"])
        ops: list[tuple[int, int]] = []
        # 80% of the rewritten bytes as whole blocks (runs of 1-2 blocks), 20% as small writes at any byte offset.
        whole = 0
        while whole < quota * 0.8:
            run = min(rng.randint(1, 2), nblocks)
            start = rng.randrange(0, nblocks - run + 1)
            ops.append((start * BLOCK, run * BLOCK))
            whole += run * BLOCK
        # Small writes land in a few hot regions (logs, journals, metadata): ~5% of the blocks per layer.
        hot = rng.sample(range(nblocks), max(1, nblocks // 20))
        small = 0
        while small < quota * 0.2:
            length = max(1, int(2 ** rng.uniform(0, 17)))  # 1 B .. 128 KiB, log-uniform
            offset = min(rng.choice(hot) * BLOCK + rng.randrange(0, BLOCK), size - length)
            ops.append((offset, length))
            small += length
        rng.shuffle(ops)
        for offset, length in ops:
            _write_run(layer, offset, gen.fill(length))
        parent = layer
    leaf = directory / names[-1]
    problems = vhdcore.check(str(leaf))
    if problems:
        raise SystemExit(f"error: the generated chain has problems: {[p.message for p in problems][:5]}")
    chain = vhdcore.open_chain(str(leaf))
    info: dict[str, Any] = {
        "params": params,
        "files": names,
        "leaf": names[-1],
        "build_seconds": round(time.perf_counter() - started, 2),
        "layers": [
            {
                "file": Path(layer.path).name,
                "type": layer.disk_type,
                "file_size": layer.file_size,
                "allocated_blocks": layer.allocated_blocks,
                "max_table_entries": layer.max_table_entries,
            }
            for layer in chain.layers
        ],
        "extents": len(chain.map()),
    }
    (directory / "meta.json").write_text(json.dumps(info, indent=2))
    log(f"depth-3 chain: built in {info['build_seconds']} s")
    info["dir"] = str(directory)
    info["cached"] = False
    return info


def build_chain30(workdir: Path, depth: int, writes: int, seed: int) -> dict[str, Any]:
    """Depth-`depth` chain of the largest VHD size; each layer has `writes` small scattered writes (partial bitmaps)."""
    size = int(vhdcore.MAX_VIRTUAL_SIZE)  # 2040 GiB: the "2 TiB" of the target, clamped to the VHD maximum
    params: dict[str, Any] = {
        "kind": "chain30",
        "version": GENERATOR_VERSION,
        "size": size,
        "depth": depth,
        "writes": writes,
        "seed": seed,
    }
    directory = _cache_dir(workdir, "chain30", params)
    cached = _load_cached(directory, params)
    if cached is not None:
        log(f"depth-{depth} chain: cached in {directory}")
        cached["dir"] = str(directory)
        cached["cached"] = True
        return cached
    log(f"depth-{depth} chain: building {size / GiB:g} GiB x {depth} layers, {writes} writes each, in {directory}")
    started = time.perf_counter()
    _fresh_dir(directory)
    rng = random.Random(seed * 1_000_003 + depth)
    nblocks = size // BLOCK
    hot = rng.sample(range(nblocks), 1000)  # blocks that several layers rewrite, so bitmaps overlap across layers
    names = ["l00.vhd"] + [f"l{i:02d}.vhd" for i in range(1, depth)]
    vhdcore.create(str(directory / names[0]), size)
    for i, name in enumerate(names):
        path = directory / name
        if i > 0:
            vhdcore.snapshot(str(directory / names[i - 1]), str(path))
        layer_started = time.perf_counter()
        for _ in range(writes):
            block = rng.choice(hot) if rng.random() < 0.6 else rng.randrange(nblocks)
            length = SECTOR * rng.randint(1, 128)  # 512 B .. 64 KiB
            if rng.random() < 0.5:  # half of them unaligned
                length -= rng.randint(1, SECTOR - 1)
            within = rng.randrange(0, BLOCK - length)
            if rng.random() < 0.5:
                within -= within % SECTOR
            vhdcore.write(str(path), block * BLOCK + within, rng.randbytes(length))
        if i in (0, 1) or (i + 1) % 5 == 0:
            log(f"  layer {i + 1}/{depth}: {writes} writes in {time.perf_counter() - layer_started:.1f} s")
    leaf = directory / names[-1]
    chain = vhdcore.open_chain(str(leaf))
    info: dict[str, Any] = {
        "params": params,
        "files": names,
        "leaf": names[-1],
        "build_seconds": round(time.perf_counter() - started, 2),
        "virtual_size": chain.virtual_size,
        "depth": chain.depth,
        "allocated_blocks": sum(layer.allocated_blocks for layer in chain.layers),
        "file_bytes": sum(layer.file_size for layer in chain.layers),
        "disk_bytes": sum((directory / n).stat().st_blocks * 512 for n in names),
        "extents": len(chain.map()),
    }
    (directory / "meta.json").write_text(json.dumps(info, indent=2))
    log(f"depth-{depth} chain: built in {info['build_seconds']} s")
    info["dir"] = str(directory)
    info["cached"] = False
    return info


# --------------------------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------------------------


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def best_of(
    runs: int, fn: Callable[[], object], after: Callable[[], object] | None = None
) -> tuple[float, list[float]]:
    times: list[float] = []
    for _ in range(runs):
        times.append(timed(fn))
        if after is not None:
            after()
    return min(times), times


def run_cmd(argv: list[str]) -> None:
    subprocess.run(argv, stdout=subprocess.DEVNULL, check=True)


def cat_files(files: list[Path]) -> None:
    run_cmd(["cat", *map(str, files)])


def unlink(path: Path) -> None:
    """Deletes an output, then flushes the file system so its write-back does not land in the next timed run."""
    path.unlink(missing_ok=True)
    os.sync()


@dataclass
class Row:
    benchmark: str
    ours: float  # MB/s for throughput rows, ms for time rows
    unit: str  # "MB/s" or "ms"
    ours_seconds: float
    peer_name: str | None = None
    peer: float | None = None
    peer_seconds: float | None = None
    ratio: float | None = None  # ours / peer throughput (higher is better)
    target: str = ""
    met: bool | None = None
    runs: dict[str, list[float]] = field(default_factory=dict)
    note: str = ""


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / MB


def parallel_read(files: list[Path], readers: int) -> None:
    """Reads the files' bytes to /dev/null with `readers` concurrent dd processes, each on a contiguous share."""
    sizes = [f.stat().st_size for f in files]
    total = sum(sizes)
    share = -(-total // readers)
    scripts: list[str] = []
    for r in range(readers):
        lo, hi = r * share, min((r + 1) * share, total)
        cmds: list[str] = []
        base = 0
        for f, size in zip(files, sizes, strict=True):
            s, e = max(lo, base), min(hi, base + size)
            if s < e:
                cmds.append(
                    f"dd if={shlex.quote(str(f))} of=/dev/null bs=1M iflag=skip_bytes,count_bytes skip={s - base} "
                    f"count={e - s} status=none"
                )
            base += size
        scripts.append(" && ".join(cmds) or "true")
    procs = [subprocess.Popen(["sh", "-c", script]) for script in scripts]
    if any(proc.wait() != 0 for proc in procs):
        raise SystemExit("error: a dd reader failed")


def cat_to_file(files: list[Path], out: Path) -> None:
    with open(out, "wb") as f:
        subprocess.run(["cat", *map(str, files)], stdout=f, check=True)


def bench_export(chain3: dict[str, Any], workdir: Path, runs: int) -> list[Row]:
    directory = Path(chain3["dir"])
    files = [directory / n for n in chain3["files"]]
    leaf = str(directory / chain3["leaf"])
    file_bytes = sum(f.stat().st_size for f in files)
    virtual = vhdcore.open_chain(leaf).virtual_size
    readers = len(os.sched_getaffinity(0))
    note = f"virtual {virtual / GiB:g} GiB; chain files {file_bytes / MB:.0f} MB"
    log(f"export: warming the page cache ({file_bytes / MB:.0f} MB of chain files)")
    cat_files(files)
    peers: dict[str, tuple[str, float, list[float]]] = {}
    best, all_runs = best_of(runs, lambda: cat_files(files))
    peers["cat"] = ("cat files > /dev/null", best, all_runs)
    best, all_runs = best_of(runs, lambda: parallel_read(files, readers))
    peers["par"] = (f"{readers} dd readers in parallel > /dev/null", best, all_runs)
    cat_out = workdir / "cat-bench.out"
    unlink(cat_out)
    best, all_runs = best_of(runs, lambda: cat_to_file(files, cat_out), lambda: unlink(cat_out))
    peers["catfile"] = ("cat files > file (same file system)", best, all_runs)
    for name, peer_best, _ in peers.values():
        log(f"export: peer {name}: {mbps(file_bytes, peer_best):.0f} MB/s ({peer_best:.3f} s)")

    rows: list[Row] = []

    def add(name: str, best: float, all_runs: list[float], peer: str, target: str | None) -> None:
        peer_name, peer_best, peer_all = peers[peer]
        rate = mbps(virtual, best)
        peer_rate = mbps(file_bytes, peer_best)
        ratio = rate / peer_rate
        log(f"export: {name}: {rate:.0f} MB/s ({best:.3f} s), {ratio:.2f}x {peer_name}")
        rows.append(
            Row(
                benchmark=name,
                ours=rate,
                unit="MB/s",
                ours_seconds=best,
                peer_name=peer_name,
                peer=peer_rate,
                peer_seconds=peer_best,
                ratio=ratio,
                target=target or "(info)",
                met=None if target is None else ratio >= 0.8,
                runs={"ours": all_runs, "peer": peer_all},
                note=note,
            )
        )

    raw_null, raw_null_all = best_of(runs, lambda: vhdcore.open_chain(leaf).export("/dev/null", "raw"))
    out_raw = workdir / "export-bench.raw"
    unlink(out_raw)
    raw_file, raw_file_all = best_of(
        runs, lambda: vhdcore.open_chain(leaf).export(str(out_raw), "raw"), lambda: unlink(out_raw)
    )
    out_vhd = workdir / "export-bench.vhd"
    unlink(out_vhd)
    vhd_file, vhd_file_all = best_of(
        runs, lambda: vhdcore.open_chain(leaf).export(str(out_vhd), "vhd"), lambda: unlink(out_vhd)
    )
    add("export depth-3 chain → raw /dev/null", raw_null, raw_null_all, "cat", "≥ 0.80×")
    add("export depth-3 chain → raw file", raw_file, raw_file_all, "cat", "≥ 0.80×")
    add("export depth-3 chain → vhd file", vhd_file, vhd_file_all, "cat", "≥ 0.80×")
    add("export depth-3 chain → raw /dev/null (vs all cores reading)", raw_null, raw_null_all, "par", None)
    add("export depth-3 chain → raw file (vs a copy that writes too)", raw_file, raw_file_all, "catfile", None)
    return rows


def bench_single(chain3: dict[str, Any], workdir: Path, runs: int, verify: bool) -> list[Row]:
    base = Path(chain3["dir"]) / chain3["files"][0]
    virtual = vhdcore.open_chain(str(base)).virtual_size
    qemu = shutil.which("qemu-img")
    cat_files([base])
    ours_out = workdir / "single-ours.raw"
    peer_out = workdir / "single-qemu.raw"
    for p in (ours_out, peer_out):
        unlink(p)
    ours_best, ours_all = best_of(
        runs, lambda: vhdcore.open_chain(str(base)).export(str(ours_out), "raw"), lambda: unlink(ours_out)
    )
    ours_rate = mbps(virtual, ours_best)
    row = Row(
        benchmark="single dynamic VHD (base) → raw file",
        ours=ours_rate,
        unit="MB/s",
        ours_seconds=ours_best,
        target="> 1.00× (faster)",
        runs={"ours": ours_all},
        note=f"virtual {virtual / GiB:g} GiB; base file {base.stat().st_size / MB:.0f} MB",
    )
    if qemu is None:
        row.note += "; qemu-img not found: peer skipped"
        log("single: qemu-img not found, skipping the peer")
        return [row]
    argv = [qemu, "convert", "-f", "vpc", "-O", "raw", str(base), str(peer_out)]
    peer_best, peer_all = best_of(runs, lambda: run_cmd(argv), lambda: unlink(peer_out))
    row.peer_name = "qemu-img convert -f vpc -O raw"
    row.peer = mbps(virtual, peer_best)
    row.peer_seconds = peer_best
    row.ratio = ours_rate / row.peer
    row.met = row.ratio > 1.0
    row.runs["peer"] = peer_all
    log(f"single: ours {ours_rate:.0f} MB/s ({ours_best:.3f} s), qemu-img {row.peer:.0f} MB/s ({peer_best:.3f} s)")
    if verify:  # outside the timings: both tools must produce the same disk, or the comparison means nothing
        vhdcore.open_chain(str(base)).export(str(ours_out), "raw")
        run_cmd(argv)
        same = subprocess.run(["cmp", "-s", str(ours_out), str(peer_out)], check=False).returncode == 0
        row.note += "; outputs identical (cmp)" if same else "; OUTPUTS DIFFER (cmp)"
        log(f"single: outputs {'identical' if same else 'DIFFER'}")
        unlink(ours_out)
        unlink(peer_out)
    return [row]


def bench_map(chain30: dict[str, Any], runs: int) -> list[Row]:
    leaf = str(Path(chain30["dir"]) / chain30["leaf"])
    vhdcore.open_chain(leaf).map()  # warm-up: page cache of the BATs and bitmaps
    opens: list[float] = []
    maps: list[float] = []
    totals: list[float] = []
    extents = 0
    for _ in range(runs):
        t0 = time.perf_counter()
        chain = vhdcore.open_chain(leaf)
        t1 = time.perf_counter()
        extents = len(chain.map())
        t2 = time.perf_counter()
        opens.append(t1 - t0)
        maps.append(t2 - t1)
        totals.append(t2 - t0)
        del chain  # free it before the next open, so two chains never coexist
    depth = chain30["depth"]
    size = f"{chain30['virtual_size'] / GiB:g} GiB"
    note = f"depth {depth}, {size}, {chain30['allocated_blocks']} allocated blocks, {extents} extents"
    log(f"map: open {min(opens) * 1e3:.1f} ms, map {min(maps) * 1e3:.1f} ms, both {min(totals) * 1e3:.1f} ms")
    return [
        Row(
            benchmark=f"chain map depth-{depth} {size}: map() (open excluded)",
            ours=min(maps) * 1e3,
            unit="ms",
            ours_seconds=min(maps),
            target="< 100 ms",
            met=min(maps) < 0.1,
            runs={"ours": maps},
            note=f"{note}; median {statistics.median(maps) * 1e3:.1f} ms",
        ),
        Row(
            benchmark=f"chain map depth-{depth} {size}: open_chain()",
            ours=min(opens) * 1e3,
            unit="ms",
            ours_seconds=min(opens),
            target="(info)",
            runs={"ours": opens},
            note=f"{note}; median {statistics.median(opens) * 1e3:.1f} ms",
        ),
        Row(
            benchmark=f"chain map depth-{depth} {size}: open_chain() + map()",
            ours=min(totals) * 1e3,
            unit="ms",
            ours_seconds=min(totals),
            target="< 100 ms (if open counts)",
            met=min(totals) < 0.1,
            runs={"ours": totals},
            note=f"{note}; median {statistics.median(totals) * 1e3:.1f} ms",
        ),
    ]


# --------------------------------------------------------------------------------------------------------------------
# Machine and output
# --------------------------------------------------------------------------------------------------------------------


def _first_line(argv: list[str], cwd: Path | None = None) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=cwd).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.splitlines()[0].strip() if out.strip() else None


def machine_info(workdir: Path) -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) * 1024
                break
    except OSError:
        pass
    repo = Path(__file__).resolve().parent.parent
    rev = _first_line(["git", "describe", "--always", "--dirty"], cwd=repo)
    try:
        from importlib.metadata import version

        package = version("cloud-imaging")
    except Exception:  # any metadata problem: just unknown
        package = None
    # The installed native module may be older than the checkout: say when it was built.
    native = getattr(getattr(vhdcore, "_vhdcore", None), "__file__", None) or vhdcore.__file__
    built = time.strftime("%Y-%m-%d %H:%M", time.localtime(Path(native).stat().st_mtime)) if native else None
    df = subprocess.run(["df", "--output=fstype", str(workdir)], capture_output=True, text=True, check=False)
    fs = df.stdout.split()[-1] if df.returncode == 0 and df.stdout.split() else None
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "ram_bytes": ram,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "vhdcore": {"package": package, "module": native, "module_built": built, "checkout_rev": rev},
        "qemu_img": _first_line(["qemu-img", "--version"]),
        "cat": _first_line(["cat", "--version"]),
        "workdir": str(workdir),
        "workdir_fs": fs,
        "loadavg_end": _loadavg(),
    }


def _loadavg() -> str | None:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return None


def fmt_value(value: float | None, unit: str, seconds: float | None) -> str:
    if value is None:
        return "—"
    if unit == "MB/s":
        return f"{value:,.0f} MB/s ({seconds:.3f} s)"
    return f"{value:.1f} ms"


def fmt_ours(row: dict[str, Any]) -> str:
    text = fmt_value(row["ours"], row["unit"], row["ours_seconds"])
    if row["unit"] == "ms" and row["runs"].get("ours"):
        text += f" (median {statistics.median(row['runs']['ours']) * 1e3:.1f})"
    return text


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    ram = f"{m['ram_bytes'] / GiB:.1f} GiB" if m["ram_bytes"] else "?"
    lines = [
        f"Machine: {m['nproc']} CPUs (nproc), {m['cpu']}, {ram} RAM, kernel {m['kernel']}, "
        f"work dir on {m['workdir_fs']}; Python {m['python']}; vhdcore {m['vhdcore']['package']} "
        f"(native module built {m['vhdcore']['module_built']}; checkout {m['vhdcore']['checkout_rev']}); "
        f"{m['qemu_img'] or 'qemu-img: not found'}; "
        f"load average {m['loadavg_start']} at start, {m['loadavg_end']} at end",
        "",
        "| benchmark | ours | peer | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        peer = "—"
        if r["peer"] is not None:
            peer = f"{r['peer_name']}: {fmt_value(r['peer'], r['unit'], r['peer_seconds'])}"
        elif r["peer_name"]:
            peer = r["peer_name"]
        ratio = f"{r['ratio']:.2f}×" if r["ratio"] is not None else "—"
        met = "—" if r["met"] is None else ("yes" if r["met"] else "**NO**")
        ours = fmt_ours(r)
        lines.append(f"| {r['benchmark']} | {ours} | {peer} | {ratio} | {r['target']} | {met} |")
    lines.append("")
    c3, c30 = report["chain3"], report["chain30"]
    layers = c3["layers"]
    lines.append(
        f"Depth-3 chain: {c3['params']['size'] / GiB:g} GiB, "
        + ", ".join(f"{la['file']} {la['allocated_blocks']} blocks, {la['file_size'] / MB:.0f} MB" for la in layers)
        + f"; {c3['extents']} map extents; "
        + (f"cached (built in {c3['build_seconds']} s)" if c3["cached"] else f"built in {c3['build_seconds']} s")
    )
    lines.append(
        f"Depth-{c30['depth']} chain: {c30['virtual_size'] / GiB:g} GiB (VHD maximum; 2 TiB is over it), "
        f"{c30['params']['writes']} small writes per layer, {c30['allocated_blocks']} allocated blocks, "
        f"{c30['extents']} extents, {c30['disk_bytes'] / MB:.0f} MB on disk; "
        + (f"cached (built in {c30['build_seconds']} s)" if c30["cached"] else f"built in {c30['build_seconds']} s")
    )
    lines.append(
        "Throughput in MB/s = 10^6 bytes/s: of the virtual disk for vhdcore and qemu-img, of the files' bytes for "
        "cat and dd; "
        f"best of {report['params']['runs']} (map: best of {report['params']['map_runs']}, median in parentheses), "
        "page cache warm. "
        f"Ratio = ours ÷ peer. Whole run: {report['total_seconds']:.1f} s."
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--size-gib", type=float, default=2.0, help="virtual size of the depth-3 chain (default 2)")
    parser.add_argument(
        "--workdir",
        type=Path,
        default=Path(os.environ.get("TMPDIR", "/tmp")) / "cloud-imaging-bench",
        help="where the generated disks are cached and outputs written (default $TMPDIR/cloud-imaging-bench)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON instead of a markdown table")
    parser.add_argument("--seed", type=int, default=1, help="seed of the generated data (default 1)")
    parser.add_argument("--runs", type=int, default=3, help="runs per throughput measurement, best kept (default 3)")
    parser.add_argument("--map-runs", type=int, default=5, help="runs of open_chain + map, best kept (default 5)")
    parser.add_argument("--map-depth", type=int, default=30, help="depth of the chain-map chain (default 30)")
    parser.add_argument("--map-writes", type=int, default=200, help="small writes per layer (default 200)")
    parser.add_argument("--no-verify", action="store_true", help="skip comparing our raw output with qemu-img's")
    args = parser.parse_args(argv)

    size = int(args.size_gib * GiB) // BLOCK * BLOCK
    if size < 16 * BLOCK:
        parser.error("--size-gib is too small (at least 32 MiB)")
    if not 1 <= args.map_depth <= vhdcore.MAX_CHAIN_DEPTH:
        parser.error(f"--map-depth must be between 1 and {vhdcore.MAX_CHAIN_DEPTH}")
    if args.runs < 1 or args.map_runs < 1:
        parser.error("--runs and --map-runs must be at least 1")
    started = time.perf_counter()
    loadavg_start = _loadavg()
    workdir: Path = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)

    log("loading the data corpus (text, ELF, compressed files of this machine)")
    corpus = Corpus.load()
    log(f"corpus {corpus.fingerprint}: {corpus.sources} in {time.perf_counter() - started:.1f} s")
    chain3 = build_chain3(workdir, size, args.seed, corpus)
    chain30 = build_chain30(workdir, args.map_depth, args.map_writes, args.seed)

    rows: list[Row] = []
    rows += bench_export(chain3, workdir, args.runs)
    rows += bench_single(chain3, workdir, args.runs, not args.no_verify)
    rows += bench_map(chain30, args.map_runs)

    machine = machine_info(workdir)
    machine["loadavg_start"] = loadavg_start
    report: dict[str, Any] = {
        "machine": machine,
        "params": {
            "size": size,
            "seed": args.seed,
            "runs": args.runs,
            "map_runs": args.map_runs,
            "map_depth": args.map_depth,
            "map_writes": args.map_writes,
        },
        "corpus": {"fingerprint": corpus.fingerprint, **corpus.sources},
        "chain3": chain3,
        "chain30": chain30,
        "rows": [asdict(r) for r in rows],
        "total_seconds": round(time.perf_counter() - started, 2),
    }
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render_markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
