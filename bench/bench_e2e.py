#!/usr/bin/env python3
"""The imaging job as a user runs it (DESIGN §8 "measured as users run it", issue 13): whole commands in fresh
processes, page cache warm, on disks this project's tests and tuning have never seen.

    python bench/bench_e2e.py [--only 1g] [--runs 3] [--workdir /tmp/cloud-imaging-bench-e2e] [--json]

Why: the other benches time the compressor or the workflow from inside a warm interpreter, on the project's own
data mixes. A user types `imaging image create --disk D --wait` and waits for the prompt: interpreter start,
imports, the embedded engine's start and shutdown, every state of the workflow, the upload into the store and the
output are all part of what they wait for. This script times exactly that, beside what the same user would do
without us, on the same disks:

- **ours**: `imaging image create --disk D --wait --json` (the installed console script, a fresh process per run,
  its own data directory under the work dir; the image is deleted with `imaging image delete` after each run). The
  wall time from fork to exit, the child's peak RSS (`ru_maxrss` from `os.wait4`), and from the image record on
  stdout: the manifest's state timings (QUEUED/SAVING/UPLOADING, upload_seconds), its predicted_seconds and the
  compressed size.
- **estimate**: `imaging vhd estimate D --json` (fresh process), the prediction a user sees before starting; its
  predicted time is compared with the measured job.
- **naive**: `qemu-img convert -f vpc -O raw D raw && zstd -q -3 -T<cores> raw -o raw.zst && cp raw.zst store/`,
  each a fresh process, timed from the first start to the last exit (outputs deleted after each run).
- **Chain.compress**: `vhdcore.open_chain(D).compress(out)` in a fresh `python3 -c`, timed inside the process
  around the call only: what the compressor costs; job time / this = the **orchestration ratio**.
- **startup**: median of 5 fresh runs of `imaging --version`, `imaging --help`, `imaging vhd info D --json`, with
  `python3 -c pass` beside them (the interpreter's own start).

Every figure is the median of `--runs` runs (default 3); before each run the disk's file is read once with `cat`
(page cache warm: these are not disk-device numbers).

The disks (single dynamic VHDs, because qemu-img cannot read differencing VHDs, 2 MiB blocks) are written through
`vhdcore.create` and `vhdcore.write` by a generator of this file only (not the tests' samples, not bench_vhd's
seeds or mix), and cached in the work directory under a key of their parameters:
- `mixed-1g`, `mixed-8g`: ~80% of the blocks allocated in extents of 1-512 blocks, like a system disk: segments of
  zeros 12%, text 18%, ELF 30%, already-compressed 22%, random 10%, log text 8% (by bytes), file-sized (4 KiB-4 MiB,
  log-normal around 64 KiB).
- `text-1g`, `text-8g`: ~65% allocated, like a database/log server: log files 30% (syslog, access log, JSON and
  application logs with stack traces), 8 KiB database pages 22% (row tuples, free space), repeated pages 10% (one
  page many times, only the LSN differs), text 18%, zeros 8%, ELF 5%, compressed 5%, random 2%.
- `sparse-32g`: ~10% allocated in runs of 1-4 blocks scattered over 32 GiB, the mixed content.
The extents are written in a seeded random order, so a file's blocks are not in virtual order (as on a disk that
grew over time). The machine files the data is sliced from (text, ELF, packed files) are read once into pools
several times the size of bench_vhd's; log text and database pages are synthesized. Each disk is checked once with
`qemu-img info` (a valid vpc image of the right virtual size).

The machine may be shared: before each run the script waits (a while) for the rest of the machine to be idle, counts
the CPU time others used during the run (/proc/stat), and redoes a run they disturbed (--max-foreign, --retries).

Markdown on stdout (progress on stderr), or everything as one JSON document with --json. See bench/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import statistics
import struct
import subprocess
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vhd import BLOCK, MB, GiB, KiB, MiB, _fill_pool, _is_text, _loadavg, _walk_files, machine_info

import vhdcore  # bench_vhd, imported first, says how to install it when it is missing

GENERATOR_VERSION = 1
PAGE = 8 * KiB  # database page
WRITE_CHUNK = 4 * MiB
CORES = len(os.sched_getaffinity(0))
DEFAULT_WORKDIR = Path("/tmp/cloud-imaging-bench-e2e")
PYTHON = sys.executable


def _console_script() -> str:
    script = Path(sysconfig.get_path("scripts")) / "imaging"
    if script.is_file():
        return str(script)
    found = shutil.which("imaging")
    if not found:
        sys.exit("error: no `imaging` console script; install the project first")
    return found


IMAGING = _console_script()

_T0 = time.perf_counter()


def log(msg: str) -> None:
    print(f"[e2e {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------------
# The disks
# --------------------------------------------------------------------------------------------------------------------

# Content mixes, by bytes. "log", "db" and "db-repeat" are synthesized; text/elf/compressed are machine files.
CONTENT: dict[str, dict[str, float]] = {
    "mixed": {"zeros": 0.12, "text": 0.18, "elf": 0.30, "compressed": 0.22, "random": 0.10, "log": 0.08},
    "text-heavy": {
        "zeros": 0.08,
        "log": 0.30,
        "db": 0.22,
        "db-repeat": 0.10,
        "text": 0.18,
        "elf": 0.05,
        "compressed": 0.05,
        "random": 0.02,
    },
}


@dataclass(frozen=True)
class DiskSpec:
    name: str
    content: str  # a key of CONTENT
    size: int
    allocated: float  # fraction of the blocks
    run_median: float  # allocated extents: log-normal length in blocks around this median
    run_sigma: float
    run_max: int
    seed: int

    def params(self) -> dict[str, Any]:
        return {**asdict(self), "generator": GENERATOR_VERSION, "block": BLOCK}


def _seed(label: str) -> int:
    return int.from_bytes(hashlib.sha256(f"cloud-imaging e2e {label}".encode()).digest()[:8], "big")


DISKS = [
    DiskSpec("mixed-1g", "mixed", 1 * GiB, 0.80, 6.0, 1.1, 512, _seed("mixed-1g")),
    DiskSpec("text-1g", "text-heavy", 1 * GiB, 0.65, 12.0, 1.0, 512, _seed("text-1g")),
    DiskSpec("mixed-8g", "mixed", 8 * GiB, 0.80, 6.0, 1.1, 512, _seed("mixed-8g")),
    DiskSpec("text-8g", "text-heavy", 8 * GiB, 0.65, 12.0, 1.0, 512, _seed("text-8g")),
    DiskSpec("sparse-32g", "mixed", 32 * GiB, 0.10, 1.6, 0.5, 4, _seed("sparse-32g")),
]


class Pools:
    """Bytes the segments are sliced from: machine files (read once) and synthesized logs and database pages."""

    TEXT_CAP = 128 * MiB
    ELF_CAP = 256 * MiB
    COMPRESSED_CAP = 160 * MiB
    LOG_SIZE = 96 * MiB
    DB_PAGES = 8192

    def __init__(self) -> None:
        started = time.perf_counter()
        used: list[tuple[str, int]] = []
        site = Path(sysconfig.get_paths()["purelib"])
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        text_suffixes = {
            "",
            ".py",
            ".txt",
            ".h",
            ".c",
            ".rst",
            ".md",
            ".json",
            ".html",
            ".xml",
            ".cfg",
            ".conf",
            ".pyi",
        }
        self.text = _fill_pool(
            _walk_files(
                [site, Path("/usr/share/doc"), Path("/usr/include"), stdlib, Path("/etc")],
                lambda p: p.suffix in text_suffixes,
            ),
            self.TEXT_CAP,
            _is_text,
            used,
        )
        elf_roots = [Path("/usr/lib/x86_64-linux-gnu"), Path("/usr/libexec"), Path("/usr/lib"), Path("/usr/bin"), site]
        self.elf = _fill_pool(_walk_files(elf_roots, lambda p: True), self.ELF_CAP, lambda d: d[:4] == b"\x7fELF", used)
        packed = {".gz", ".xz", ".zst", ".bz2", ".lz4", ".zip", ".jpg", ".png", ".whl", ".jar", ".woff2", ".deb"}
        self.compressed = _fill_pool(
            _walk_files([Path("/usr/lib"), Path("/usr/share"), site, Path("/var/cache")], lambda p: p.suffix in packed),
            self.COMPRESSED_CAP,
            lambda d: True,
            used,
        )

        if len(self.compressed) < self.COMPRESSED_CAP // 2:  # top up with deflate output of the text and ELF pools
            extra, src, at = [self.compressed], self.text + self.elf, 0
            while sum(map(len, extra)) < self.COMPRESSED_CAP // 2 and src:
                extra.append(zlib.compress(src[at : at + 4 * MiB], 6))
                at = (at + 4 * MiB) % max(len(src) - 4 * MiB, 1)
            self.compressed = b"".join(extra)
        if len(self.text) < 4 * MiB or len(self.elf) < 4 * MiB:
            sys.exit("error: too few text or ELF files on this machine to slice disks from")
        self.logs = synth_logs(random.Random(_seed("logs")), self.LOG_SIZE)
        self.db = synth_db_pages(random.Random(_seed("db")), self.DB_PAGES)
        digest = hashlib.sha256()
        for path, size in used:
            digest.update(f"{path}\0{size}\n".encode())
        for pool in (self.text, self.elf, self.compressed, self.logs, self.db):
            digest.update(hashlib.sha256(pool).digest())
        self.fingerprint = digest.hexdigest()[:16]
        self.sources = {
            "files": len(used),
            "text": len(self.text),
            "elf": len(self.elf),
            "compressed": len(self.compressed),
            "logs": len(self.logs),
            "db": len(self.db),
            "seconds": round(time.perf_counter() - started, 2),
        }


def synth_logs(rng: random.Random, size: int) -> bytes:
    """Log files of four formats, a few thousand lines each, with increasing timestamps and realistic fields."""
    hosts = [f"{rng.choice(['web', 'api', 'db', 'cache', 'worker'])}-{rng.randint(1, 40):02d}" for _ in range(24)]
    procs = ["sshd", "cron", "systemd", "kernel", "nginx", "postgres", "dockerd", "containerd", "sudo", "CRON"]
    ips = [
        f"{rng.randint(10, 223)}.{rng.randint(0, 255)}.{rng.randint(0, 255)}.{rng.randint(1, 254)}" for _ in range(300)
    ]
    words = (  # noqa: SIM905 (a sentence reads better than 41 quoted words)
        "user session opened closed for from port accepted publickey connection reset timeout retry backoff "
        "request response cache miss hit evicted flushed checkpoint vacuum autovacuum table index scan rows "
        "worker started stopped finished failed succeeded queue job task upload download bytes latency"
    ).split()
    resources = ["orders", "users", "items", "carts", "invoices", "sessions", "search", "static/js", "static/css"]
    agents = [
        "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0 Safari/537.36",
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:127.0) Gecko/20100101 Firefox/127.0",
        "curl/8.5.0",
        "python-requests/2.32.3",
        "Go-http-client/1.1",
        "kube-probe/1.30",
    ]
    loggers = ["app.api.orders", "app.db.pool", "app.jobs.runner", "app.auth", "app.cache", "urllib3.connectionpool"]
    levels = ["INFO"] * 16 + ["DEBUG"] * 6 + ["WARN"] * 2 + ["ERROR"]
    months = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]
    parts: list[str] = []
    total = 0
    clock = 1_767_225_600.0 + rng.uniform(0, 3e7)  # 2026
    stamp_second = -1
    iso = clf = sysl = ""
    while total < size:
        kind = rng.choice(["syslog", "access", "json", "app"])
        lines = []
        for _ in range(rng.randint(300, 6000)):
            clock += rng.expovariate(40.0)
            second = int(clock)
            if second != stamp_second:
                stamp_second = second
                t = time.gmtime(second)
                iso = time.strftime("%Y-%m-%dT%H:%M:%S", t)
                clf = f"{t.tm_mday:02d}/{months[t.tm_mon - 1]}/{t.tm_year}:{time.strftime('%H:%M:%S', t)} +0000"
                sysl = f"{months[t.tm_mon - 1]} {t.tm_mday:2d} {time.strftime('%H:%M:%S', t)}"
            ms = int((clock - second) * 1000)
            if kind == "access":
                res = rng.choice(resources)
                path = f"/{res}/{rng.randint(1, 99999)}" if rng.random() < 0.7 else f"/{res}?page={rng.randint(1, 50)}"
                status = rng.choice([200] * 30 + [201, 204, 301, 304, 304, 400, 401, 404, 404, 500, 502])
                lines.append(
                    f'{rng.choice(ips)} - - [{clf}] "{rng.choice(["GET"] * 5 + ["POST", "PUT", "DELETE"])} {path} '
                    f'HTTP/1.1" {status} {rng.randint(0, 80000)} "-" "{rng.choice(agents)}" {rng.random() * 0.8:.3f}\n'
                )
            elif kind == "syslog":
                msg = " ".join(rng.choices(words, k=rng.randint(4, 14)))
                lines.append(
                    f"{sysl} {rng.choice(hosts)} {rng.choice(procs)}[{rng.randint(100, 65000)}]: {msg}"
                    f" {rng.choice(ips)} port {rng.randint(1024, 65535)}\n"
                )
            elif kind == "json":
                lines.append(
                    f'{{"ts":"{iso}.{ms:03d}Z","level":"{rng.choice(levels)}","logger":"{rng.choice(loggers)}",'
                    f'"msg":"{" ".join(rng.choices(words, k=rng.randint(3, 9)))}","request_id":"'
                    f'{rng.getrandbits(64):016x}","duration_ms":{rng.expovariate(0.05):.1f},'
                    f'"user_id":{rng.randint(1, 250000)}}}\n'
                )
            else:
                level = rng.choice(levels)
                lines.append(
                    f"{iso},{ms:03d} {level:5} [worker-{rng.randint(1, 16)}] {rng.choice(loggers)} - "
                    f"{' '.join(rng.choices(words, k=rng.randint(5, 16)))} id={rng.getrandbits(32):08x}\n"
                )
                if level == "ERROR":
                    frames = rng.randint(4, 18)
                    lines.append("Traceback (most recent call last):\n")
                    for _ in range(frames):
                        mod = rng.choice(loggers).replace(".", "/")
                        lines.append(
                            f'  File "/srv/app/{mod}.py", line {rng.randint(10, 900)}, in '
                            f"{rng.choice(words)}_{rng.choice(words)}\n    {' '.join(rng.choices(words, k=5))}()\n"
                        )
                    lines.append(f"{rng.choice(['TimeoutError', 'KeyError', 'ValueError'])}: {rng.choice(words)}\n")
        chunk = "".join(lines)
        parts.append(chunk)
        total += len(chunk)
    return "".join(parts).encode()[:size]


def synth_db_pages(rng: random.Random, count: int) -> bytes:
    """8 KiB heap pages like PostgreSQL's: header, line pointers, free space (zeros), tuples from the end."""
    statuses = [b"new", b"paid", b"shipped", b"delivered", b"cancelled", b"refunded"]
    cities = [b"Berlin", b"Lyon", b"Porto", b"Austin", b"Osaka", b"Recife", b"Tartu", b"Leeds", b"Pune", b"Perth"]
    notes = [b"", b"", b"gift", b"leave at door", b"call before delivery", b"express", b"fragile - glass"]
    row_id = rng.randint(10_000, 900_000)
    stamp = 1_700_000_000_000_000
    lsn = rng.getrandbits(40)
    pages: list[bytes] = []
    for _ in range(count):
        fill = rng.uniform(0.45, 0.98)
        tuples: list[bytes] = []
        used = 24
        while True:
            row_id += 1
            stamp += rng.randint(1_000, 90_000_000)
            city, status, note = rng.choice(cities), rng.choice(statuses), rng.choice(notes)
            data = (
                struct.pack("<qiqq", row_id, rng.randint(1, 250_000), stamp, rng.randint(100, 5_000_000))
                + bytes([len(status) * 2 + 1])
                + status
                + bytes([len(city) * 2 + 1])
                + city
                + bytes([len(note) * 2 + 1])
                + note
            )
            head = struct.pack(
                "<IIIHHHHHB", rng.randint(700, 900) * 1000, 0, 0, 0, len(pages), len(tuples) + 1, 6, 0x0902, 24
            )
            item = head + bytes(24 - len(head)) + data
            item += bytes(-len(item) % 8)
            if used + 4 + len(item) > PAGE * fill:
                break
            tuples.append(item)
            used += 4 + len(item)
        lsn += rng.randint(1, 5000)
        body = bytearray(PAGE)
        upper = PAGE
        pointers = bytearray()
        for item in tuples:
            upper -= len(item)
            body[upper : upper + len(item)] = item
            pointers += struct.pack("<I", upper | (1 << 15) | (len(item) << 17))
        lower = 24 + len(pointers)
        body[0:24] = struct.pack("<QHHHHHHI", lsn, rng.getrandbits(16), 0, lower, upper, PAGE, 0x2004, 0)
        body[24:lower] = pointers
        pages.append(bytes(body))
    return b"".join(pages)


class Segments:
    """Seeded segments of a content mix; kinds are drawn so that their shares of the bytes follow the mix."""

    def __init__(self, pools: Pools, mix: dict[str, float], rng: random.Random) -> None:
        self.pools = pools
        self.rng = rng
        self.kinds = list(mix)
        # The mix is by bytes: weigh each kind's draw by 1 / its mean segment size.
        probe = random.Random(0)
        means = {k: statistics.fmean(self._size(k, probe) for _ in range(4000)) for k in self.kinds}
        self.weights = [mix[k] / means[k] for k in self.kinds]
        self.bytes_by_kind: dict[str, int] = dict.fromkeys(self.kinds, 0)

    @staticmethod
    def _lognormal(rng: random.Random, median: float, sigma: float, low: float, high: float) -> float:
        return min(max(median * math.exp(rng.gauss(0.0, sigma)), low), high)

    def _size(self, kind: str, rng: random.Random) -> int:
        if kind in ("db", "db-repeat"):
            return PAGE * round(self._lognormal(rng, 24, 1.2, 1, 1024))
        if kind == "log":
            n = self._lognormal(rng, 512 * KiB, 1.2, 16 * KiB, 8 * MiB)
        elif kind == "zeros":
            n = self._lognormal(rng, 128 * KiB, 1.5, 4 * KiB, 8 * MiB)
        else:
            n = self._lognormal(rng, 64 * KiB, 1.4, 4 * KiB, 4 * MiB)
        return 4 * KiB * math.ceil(n / (4 * KiB))

    def _slice(self, pool: bytes, n: int, align: int = 1) -> bytes:
        if n >= len(pool):
            return (pool * (n // len(pool) + 1))[:n]
        at = self.rng.randrange(0, (len(pool) - n) // align + 1) * align
        return pool[at : at + n]

    def _make(self, kind: str, n: int) -> bytes:
        if kind == "zeros":
            return bytes(n)
        if kind == "random":
            return self.rng.randbytes(n)
        if kind == "db":
            return self._slice(self.pools.db, n, PAGE)
        if kind == "db-repeat":  # one page many times (preallocated or rewritten pages), only the LSN differs
            page = self._slice(self.pools.db, PAGE, PAGE)
            out = bytearray(page * math.ceil(n / PAGE))
            lsn = self.rng.getrandbits(40)
            for at in range(0, len(out), PAGE):
                lsn += self.rng.randint(1, 64)
                out[at : at + 8] = struct.pack("<Q", lsn)
            return bytes(out[:n])
        pool = {"text": self.pools.text, "elf": self.pools.elf, "compressed": self.pools.compressed}.get(kind)
        if pool is None:
            pool = self.pools.logs
        return self._slice(pool, n)

    def fill(self, n: int) -> bytes:
        parts: list[bytes] = []
        left = n
        while left > 0:
            kind = self.rng.choices(self.kinds, self.weights)[0]
            size = min(self._size(kind, self.rng), left)
            parts.append(self._make(kind, size))
            self.bytes_by_kind[kind] += size
            left -= size
        return b"".join(parts)


def layout(spec: DiskSpec, rng: random.Random) -> list[tuple[int, int]]:
    """Allocated extents (first block, blocks): log-normal lengths that add up to the allocated fraction exactly,
    spread over the disk with random gaps (exponential shares of the unallocated blocks)."""
    blocks = spec.size // BLOCK
    target = round(blocks * spec.allocated)
    lengths: list[int] = []
    while sum(lengths) < target:
        length = max(1, min(spec.run_max, round(spec.run_median * math.exp(rng.gauss(0.0, spec.run_sigma)))))
        lengths.append(min(length, target - sum(lengths)))
    free = blocks - target
    weights = [rng.expovariate(1.0) for _ in range(len(lengths) + 1)]
    scale = free / sum(weights)
    gaps = [math.floor(w * scale) for w in weights]
    for _ in range(free - sum(gaps)):
        gaps[rng.randrange(len(gaps))] += 1
    runs: list[tuple[int, int]] = []
    at = gaps[0]
    for length, gap in zip(lengths, gaps[1:], strict=True):
        runs.append((at, length))
        at += length + gap
    return runs


def _cache_dir(workdir: Path, spec: DiskSpec) -> Path:
    key = hashlib.sha256(json.dumps(spec.params(), sort_keys=True).encode()).hexdigest()[:12]
    return workdir / "disks" / f"{spec.name}-{key}"


def qemu_check(path: Path, size: int) -> dict[str, Any]:
    out = subprocess.run(["qemu-img", "info", "--output=json", str(path)], capture_output=True, text=True, check=True)
    info: dict[str, Any] = json.loads(out.stdout)
    if info.get("format") != "vpc" or info.get("virtual-size") != size:
        raise SystemExit(f"error: qemu-img does not see {path} as a vpc image of {size} bytes: {out.stdout}")
    return {"format": info["format"], "virtual_size": info["virtual-size"], "cluster_size": info.get("cluster-size")}


def build_disk(spec: DiskSpec, workdir: Path, pools: Callable[[], Pools]) -> dict[str, Any]:
    directory = _cache_dir(workdir, spec)
    meta = directory / "meta.json"
    disk = directory / "disk.vhd"
    if meta.is_file() and disk.is_file():
        with contextlib.suppress(ValueError):
            info: dict[str, Any] = json.loads(meta.read_text())
            if info.get("params") == spec.params() and info.get("file_size") == disk.stat().st_size:
                log(f"{spec.name}: cached ({disk})")
                return {**info, "path": str(disk), "cached": True}
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    source = pools()
    log(f"{spec.name}: building {spec.size / GiB:g} GiB ({spec.content}, ~{spec.allocated:.0%} allocated)")
    started = time.perf_counter()
    rng = random.Random(spec.seed)
    runs = layout(spec, rng)
    rng.shuffle(runs)  # the file's blocks in the order they were first written, not in virtual order
    segments = Segments(source, CONTENT[spec.content], random.Random(spec.seed ^ 0x5A5A))
    partial = directory / "disk.vhd.part"
    vhdcore.create(str(partial), spec.size)
    written = 0
    for first, count in runs:
        offset, left = first * BLOCK, count * BLOCK
        while left:
            n = min(left, WRITE_CHUNK)
            vhdcore.write(str(partial), offset, segments.fill(n))
            offset += n
            left -= n
            written += n
    partial.rename(disk)
    leaf = vhdcore.open_chain(str(disk)).leaf
    info = {
        "params": spec.params(),
        "virtual_size": spec.size,
        "allocated_blocks": leaf.allocated_blocks,
        "allocated_bytes": leaf.allocated_blocks * BLOCK,
        "file_size": disk.stat().st_size,
        "extents": len(runs),
        "bytes_by_kind": segments.bytes_by_kind,
        "pools": {"fingerprint": source.fingerprint, **source.sources},
        "build_seconds": round(time.perf_counter() - started, 2),
        "qemu_img": qemu_check(disk, spec.size),
    }
    meta.write_text(json.dumps(info, indent=2))
    log(f"{spec.name}: built in {info['build_seconds']} s, {leaf.allocated_blocks} blocks allocated")
    return {**info, "path": str(disk), "cached": False}


# --------------------------------------------------------------------------------------------------------------------
# Running commands in fresh processes
# --------------------------------------------------------------------------------------------------------------------


TIME = "/usr/bin/time"  # GNU time (Debian package `time`): the peak RSS of the command itself
CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_busy_seconds() -> float:
    """CPU seconds the whole machine has spent busy (all cores), from /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:9]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields
    return (user + nice + system + irq + softirq + steal) / CLK_TCK


@dataclass
class Proc:
    argv: list[str]
    seconds: float
    max_rss: int  # bytes: the peak RSS of the command and of the children it waited for
    cpu_seconds: float  # user + system of the command and its children
    foreign_cpu_seconds: float  # CPU time the rest of the machine used meanwhile (other sessions, tests, builds)
    returncode: int
    started_at: float  # time.time() before the fork and after the exit, to place the manifest's history in the run
    ended_at: float
    stdout: str = field(repr=False)
    stderr: str = field(repr=False)


def run_fresh(argv: list[str], scratch: Path, env: dict[str, str] | None = None, check: bool = True) -> Proc:
    """Run argv as a new process; wall time from before the fork to its exit.

    The peak RSS comes from GNU time, which runs the command: `ru_maxrss` of a child forked from this (large)
    process would start at this process's RSS (fork copies the high-water mark, vfork+exec carries it over)."""
    out_path, err_path, usage_path = scratch / "stdout.txt", scratch / "stderr.txt", scratch / "usage.txt"
    usage_path.unlink(missing_ok=True)
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        busy = cpu_busy_seconds()
        started_at = time.time()
        started = time.perf_counter()
        child = subprocess.Popen(
            [TIME, "-f", "%M %U %S", "-o", str(usage_path), *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            env=env,
        )
        _, status, _usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        ended_at = time.time()
        busy = cpu_busy_seconds() - busy
    child.returncode = os.waitstatus_to_exitcode(status)
    # On failure GNU time writes "Command exited with non-zero status N" before the format's line.
    max_rss_kib, user, system = usage_path.read_text().strip().splitlines()[-1].split()
    cpu = float(user) + float(system)
    proc = Proc(
        argv=argv,
        seconds=seconds,
        max_rss=int(max_rss_kib) * 1024,
        cpu_seconds=cpu,
        foreign_cpu_seconds=max(0.0, busy - cpu),
        returncode=child.returncode,
        started_at=started_at,
        ended_at=ended_at,
        stdout=out_path.read_text(errors="replace"),
        stderr=err_path.read_text(errors="replace"),
    )
    if check and proc.returncode != 0:
        tail = proc.stderr[-3000:] or proc.stdout[-3000:]
        raise SystemExit(f"error: {' '.join(argv)} exited with {proc.returncode}:\n{tail}")
    return proc


def wait_idle(threshold: float, timeout: float) -> float:
    """Wait (at most `timeout` s) until the machine's other work uses at most `threshold` of its cores over a
    second; returns the last busy fraction seen."""
    deadline = time.monotonic() + timeout
    said = False
    while True:
        busy, started = cpu_busy_seconds(), time.monotonic()
        time.sleep(1.0)
        fraction = (cpu_busy_seconds() - busy) / ((time.monotonic() - started) * CORES)
        if fraction <= threshold or time.monotonic() >= deadline:
            if said:
                log(f"machine busy {fraction:.0%}: {'idle enough' if fraction <= threshold else 'going on anyway'}")
            return fraction
        if not said:
            log(f"machine busy {fraction:.0%} (other sessions?): waiting up to {timeout:.0f} s for it to calm down")
            said = True


def load_of(procs: list[Proc]) -> dict[str, float]:
    """CPU time of the commands and of everything else on the machine while they ran."""
    wall = sum(p.seconds for p in procs)
    foreign = sum(p.foreign_cpu_seconds for p in procs)
    return {
        "cpu_seconds": sum(p.cpu_seconds for p in procs),
        "foreign_cpu_seconds": foreign,
        "foreign_share": foreign / (wall * CORES) if wall else 0.0,
    }


def warm(path: str) -> None:
    subprocess.run(["cat", path], stdout=subprocess.DEVNULL, check=True)


def parse_json(stdout: str, want: Callable[[dict[str, Any]], bool]) -> dict[str, Any] | None:
    """The JSON document on stdout; while stdout still carries log lines, the last object that `want` accepts
    among those starting at the beginning of a line."""
    with contextlib.suppress(ValueError):
        doc = json.loads(stdout)
        if isinstance(doc, dict) and want(doc):
            return doc
    decoder = json.JSONDecoder()
    found = None
    at = 0
    while True:
        if stdout.startswith("{", at):
            try:
                doc, end = decoder.raw_decode(stdout, at)
            except ValueError:
                end = at + 1
            else:
                if isinstance(doc, dict) and want(doc):
                    found = doc
                at = end
        nl = stdout.find("\n", at)
        if nl < 0:
            return found
        at = nl + 1


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def imaging_env(data_dir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("IMAGING_STORE", "IMAGING_STATE", "IMAGING_DISKS")}
    env["IMAGING_DATA_DIR"] = str(data_dir)
    return env


def run_ours(disk: str, data_dir: Path, scratch: Path) -> dict[str, Any]:
    env = imaging_env(data_dir)
    proc = run_fresh([IMAGING, "image", "create", "--disk", disk, "--wait", "--json"], scratch, env)
    record = parse_json(proc.stdout, lambda d: "manifest" in d and "id" in d)
    source = "stdout"
    pure = False
    with contextlib.suppress(ValueError):
        pure = isinstance(json.loads(proc.stdout), dict)
    if record is None:  # fall back to the newest manifest in the store
        manifests = sorted((data_dir / "store" / "images").glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
        if not manifests:
            raise SystemExit(f"error: no image record on stdout and no manifest in the store:\n{proc.stdout[-2000:]}")
        manifest = json.loads(manifests[-1].read_text())
        record = {"id": manifests[-1].parent.name, "manifest": manifest, "compressed_size": None}
        source = "store"
    manifest = record["manifest"]
    image_id = str(record["id"])
    # The history's first event (QUEUED) and last (ACTIVE) in the process's life: what comes before the first
    # state (interpreter, imports, engine start) and after the last (engine stop, output, exit).
    history = [datetime.fromisoformat(e["at"]).timestamp() for e in manifest.get("history", []) if e.get("at")]
    before_first = history[0] - proc.started_at if history else None
    after_last = proc.ended_at - history[-1] if history else None
    object_size = None
    object_url = record.get("object_url")
    if isinstance(object_url, str) and object_url.startswith("file://"):
        with contextlib.suppress(OSError):
            object_size = Path(object_url.removeprefix("file://")).stat().st_size
    deleted = run_fresh([IMAGING, "image", "delete", image_id, "--json"], scratch, env, check=False)
    staging = data_dir / "store" / "staging"
    leftover = sum(p.stat().st_size for p in staging.rglob("*") if p.is_file()) if staging.exists() else 0
    if staging.exists():
        shutil.rmtree(staging)  # the bench's disk space; the bytes left behind are reported
    images = data_dir / "store" / "images" / image_id
    if images.exists():
        shutil.rmtree(images)
    return {
        "seconds": proc.seconds,
        "max_rss": proc.max_rss,
        **load_of([proc]),
        "image_id": image_id,
        "record_from": source,
        "stdout_pure_json": pure,
        "stdout_lines": proc.stdout.count("\n"),
        "stderr_lines": proc.stderr.count("\n"),
        "compressed_size": record.get("compressed_size") or manifest.get("compressed_size") or object_size,
        "object_size": object_size,
        "timings": manifest.get("timings", {}),
        "before_first_state_s": before_first,
        "after_last_state_s": after_last,
        "manifest_predicted_seconds": manifest.get("predicted_seconds"),
        "manifest_predicted": {k: v for k, v in manifest.items() if "predict" in k},
        "level": manifest.get("level"),
        "chunk_size": manifest.get("chunk_size"),
        "parts": manifest.get("part_count"),
        "deleted": deleted.returncode == 0,
        "staging_leftover_bytes": leftover,
    }


def run_estimate(disk: str, data_dir: Path, scratch: Path) -> dict[str, Any]:
    proc = run_fresh([IMAGING, "vhd", "estimate", disk, "--json"], scratch, imaging_env(data_dir))
    doc = parse_json(proc.stdout, lambda d: "compressed_bytes" in d)
    if doc is None:
        raise SystemExit(f"error: no JSON from vhd estimate:\n{proc.stdout[-2000:]}")
    predicted = {k: v for k, v in doc.items() if "predict" in k or (k.endswith("seconds") and k != "seconds_spent")}
    job = doc.get("job")  # the whole job's prediction (issue 13 item 6), when the CLI gives one
    return {
        "seconds": proc.seconds,
        "max_rss": proc.max_rss,
        **load_of([proc]),
        "predicted_seconds": doc.get("predicted_seconds"),
        "predicted_job_seconds": job.get("seconds") if isinstance(job, dict) else None,
        "predicted_job": job,
        "predicted": predicted,
        "compressed_bytes": doc.get("compressed_bytes"),
        "seconds_spent": doc.get("seconds_spent"),
    }


def run_naive(disk: str, workdir: Path, scratch: Path) -> dict[str, Any]:
    folder = workdir / "naive"
    if folder.exists():
        shutil.rmtree(folder)
    store = folder / "store"
    store.mkdir(parents=True)
    raw, packed = folder / "disk.raw", folder / "disk.raw.zst"
    steps = {
        "convert": ["qemu-img", "convert", "-f", "vpc", "-O", "raw", disk, str(raw)],
        "zstd": ["zstd", "-q", "-3", f"-T{CORES}", str(raw), "-o", str(packed)],
        "cp": ["cp", str(packed), str(store) + "/"],
    }
    started = time.perf_counter()
    done = {name: run_fresh(argv, scratch) for name, argv in steps.items()}
    seconds = time.perf_counter() - started
    size = (store / packed.name).stat().st_size
    shutil.rmtree(folder)
    return {
        "seconds": seconds,
        "steps": {name: p.seconds for name, p in done.items()},
        "max_rss": max(p.max_rss for p in done.values()),
        **load_of(list(done.values())),
        "compressed_size": size,
    }


COMPRESS_SCRIPT = """\
import json, sys, time
import vhdcore
t0 = time.perf_counter()
chain = vhdcore.open_chain(sys.argv[1])
t1 = time.perf_counter()
stats = chain.compress(sys.argv[2])
t2 = time.perf_counter()
print(json.dumps({"open_s": t1 - t0, "compress_s": t2 - t1, "stats_seconds": stats.seconds,
                  "compressed_bytes": stats.compressed_bytes, "image_bytes": stats.image_bytes,
                  "level": stats.level}))
"""


def run_compress(disk: str, workdir: Path, scratch: Path) -> dict[str, Any]:
    out = workdir / "compress.vhd.zst"
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    proc = run_fresh([PYTHON, "-c", COMPRESS_SCRIPT, disk, str(out)], scratch)
    doc = json.loads(proc.stdout.strip().splitlines()[-1])
    with contextlib.suppress(FileNotFoundError):
        out.unlink()
    return {
        **doc,
        "seconds": doc["compress_s"],
        "process_seconds": proc.seconds,
        "max_rss": proc.max_rss,
        **load_of([proc]),
    }


# --------------------------------------------------------------------------------------------------------------------
# The measurements
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Quiet:
    """How the runs cope with a shared machine: wait for it to be idle before a run, redo a run others disturbed."""

    threshold: float  # wait until the rest of the machine uses at most this share of the CPUs...
    timeout: float  # ...for at most this long (0: never wait)
    max_foreign: float  # a run during which the rest used more than this share of the CPUs...
    retries: int  # ...is run again, at most this many times (the last one is kept and flagged)


def bench_disk(info: dict[str, Any], workdir: Path, runs: int, idle: Quiet) -> dict[str, Any]:
    disk = info["path"]
    name = info["params"]["name"]
    data_dir = workdir / "data"
    scratch = workdir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, Any]]] = {"estimate": [], "ours": [], "naive": [], "compress": []}
    checkout = checkout_rev()
    for run in range(runs):
        steps: list[tuple[str, Callable[[], dict[str, Any]]]] = [
            ("estimate", lambda: run_estimate(disk, data_dir, scratch)),
            ("ours", lambda: run_ours(disk, data_dir, scratch)),
            ("naive", lambda: run_naive(disk, workdir, scratch)),
            ("compress", lambda: run_compress(disk, workdir, scratch)),
        ]
        for kind, fn in steps:
            discarded: list[dict[str, Any]] = []
            while True:
                busy = wait_idle(idle.threshold, idle.timeout) if idle.timeout > 0 else None
                warm(disk)
                log(f"{name}: {kind} run {run + 1}/{runs}" + (f" (again: {len(discarded)})" if discarded else ""))
                result = {**fn(), "busy_before": busy}
                log(f"{name}: {kind} {result['seconds']:.2f} s (others used {result['foreign_share']:.0%} of the CPUs)")
                if result["foreign_share"] <= idle.max_foreign or len(discarded) >= idle.retries:
                    break
                discarded.append(result)
            results[kind].append({**result, "discarded": discarded})
    ours = results["ours"]
    timing_keys = sorted({k for r in ours for k in r["timings"]})
    summary: dict[str, Any] = {
        "ours_s": median([r["seconds"] for r in ours]),
        "ours_max_rss": median([r["max_rss"] for r in ours]),
        "ours_timings": {k: median([float(r["timings"].get(k, 0.0)) for r in ours]) for k in timing_keys},
        "ours_size": median([r["compressed_size"] for r in ours if r["compressed_size"] is not None] or [0]),
        "manifest_predicted_s": _median_or_none([r["manifest_predicted_seconds"] for r in ours]),
        "before_first_state_s": _median_or_none([r["before_first_state_s"] for r in ours]),
        "after_last_state_s": _median_or_none([r["after_last_state_s"] for r in ours]),
        "naive_s": median([r["seconds"] for r in results["naive"]]),
        "naive_steps": {k: median([r["steps"][k] for r in results["naive"]]) for k in ("convert", "zstd", "cp")},
        "naive_max_rss": median([r["max_rss"] for r in results["naive"]]),
        "naive_size": median([r["compressed_size"] for r in results["naive"]]),
        "compress_s": median([r["seconds"] for r in results["compress"]]),
        "compress_process_s": median([r["process_seconds"] for r in results["compress"]]),
        "compress_max_rss": median([r["max_rss"] for r in results["compress"]]),
        "compress_size": median([r["compressed_bytes"] for r in results["compress"]]),
        "estimate_compress_predicted_s": _median_or_none([r["predicted_seconds"] for r in results["estimate"]]),
        "estimate_job_predicted_s": _median_or_none([r["predicted_job_seconds"] for r in results["estimate"]]),
        "estimate_process_s": median([r["seconds"] for r in results["estimate"]]),
        "estimate_size": median([r["compressed_bytes"] for r in results["estimate"]]),
    }
    summary["speedup"] = summary["naive_s"] / summary["ours_s"]
    summary["orchestration"] = summary["ours_s"] / summary["compress_s"]
    summary["upload_share"] = summary["ours_timings"].get("UPLOADING", 0.0) / summary["ours_s"]
    # What a user is told the job will take: the whole job's prediction when the CLI gives one, else the compressor's.
    job_predicted = summary["estimate_job_predicted_s"]
    summary["estimate_predicted_s"] = (
        job_predicted if job_predicted is not None else summary["estimate_compress_predicted_s"]
    )
    summary["estimate_predicted_kind"] = "job" if job_predicted is not None else "compress"
    compress_predicted = summary["estimate_compress_predicted_s"]
    summary["estimate_compress_error"] = (
        None if compress_predicted is None else compress_predicted / summary["compress_s"] - 1
    )
    predicted = summary["estimate_predicted_s"]
    summary["estimate_error"] = None if predicted is None else predicted / summary["ours_s"] - 1
    summary["virtual_mbps"] = info["virtual_size"] / summary["ours_s"] / MB
    summary["foreign_share_max"] = max(r["foreign_share"] for rs in results.values() for r in rs)
    summary["runs_redone"] = sum(len(r["discarded"]) for rs in results.values() for r in rs)
    summary["checkout"] = checkout if checkout == checkout_rev() else f"{checkout} → {checkout_rev()}"
    # What the store has learned about this machine so far (its write rate, measured/predicted compress time).
    learned = data_dir / "store" / ".imaging-store" / "measured.json"
    with contextlib.suppress(OSError, ValueError):
        summary["store_measured"] = json.loads(learned.read_text())
    return {"disk": {k: v for k, v in info.items() if k != "params"} | {"name": name}, "summary": summary, **results}


def checkout_rev() -> str | None:
    """The work tree's commit (+ "-dirty"): the project is installed editable, so its Python code is what runs."""
    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=repo, capture_output=True, text=True)
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def _median_or_none(values: list[Any]) -> float | None:
    numbers = [float(v) for v in values if isinstance(v, int | float)]
    return median(numbers) if numbers else None


def bench_startup(disk: str, workdir: Path, runs: int, idle: Quiet) -> list[dict[str, Any]]:
    scratch = workdir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    env = imaging_env(workdir / "data")
    commands = [
        ("imaging --version", [IMAGING, "--version"]),
        ("imaging --help", [IMAGING, "--help"]),
        ("imaging vhd info D --json", [IMAGING, "vhd", "info", disk, "--json"]),
        ("python3 -c pass", [PYTHON, "-c", "pass"]),
    ]
    rows = []
    for label, argv in commands:
        times: list[float] = []
        rss: list[float] = []
        foreign: list[float] = []
        if idle.timeout > 0:
            wait_idle(idle.threshold, idle.timeout)
        for _ in range(runs):
            proc = run_fresh(argv, scratch, env)
            times.append(proc.seconds)
            rss.append(proc.max_rss)
            foreign.append(load_of([proc])["foreign_share"])
        log(f"startup: {label}: median {median(times):.3f} s")
        rows.append(
            {
                "command": label,
                "argv": argv,
                "seconds": times,
                "median_s": median(times),
                "min_s": min(times),
                "max_rss": median(rss),
                "foreign_share_max": max(foreign),
            }
        )
    return rows


def acceptance(disks: list[dict[str, Any]], startup: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 13's acceptance figures that this run can check."""
    by_name = {d["disk"]["name"]: d["summary"] for d in disks}
    checks: list[dict[str, Any]] = []

    def add(what: str, value: str, target: str, met: bool) -> None:
        checks.append({"check": what, "value": value, "target": target, "met": met})

    for name, s in by_name.items():
        if name.endswith("-1g"):
            add(f"{name}: speedup over naive", f"{s['speedup']:.2f}x", "≥ 1.0x", s["speedup"] >= 1.0)
        if name.endswith("-8g"):
            add(f"{name}: speedup over naive", f"{s['speedup']:.2f}x", "≥ 1.5x", s["speedup"] >= 1.5)
            add(f"{name}: job / Chain.compress", f"{s['orchestration']:.2f}x", "≤ 1.2x", s["orchestration"] <= 1.2)
        add(f"{name}: UPLOADING share of the job", f"{s['upload_share']:.1%}", "≤ 5%", s["upload_share"] <= 0.05)
        if s["estimate_error"] is not None:
            err = s["estimate_error"]
            add(f"{name}: estimate's predicted time vs job", f"{err:+.0%}", "within ±25%", abs(err) <= 0.25)
    if "sparse-32g" in by_name and "mixed-1g" in by_name:
        ratio = by_name["sparse-32g"]["ours_max_rss"] / by_name["mixed-1g"]["ours_max_rss"]
        add("peak RSS sparse-32g / mixed-1g", f"{ratio:.2f}x", "≤ 1.1x", ratio <= 1.1)
    for row in startup:
        if row["command"].startswith("imaging"):
            add(f"start: {row['command']}", f"{row['median_s']:.3f} s", "≤ 0.25 s", row["median_s"] <= 0.25)
    return checks


# --------------------------------------------------------------------------------------------------------------------
# Output
# --------------------------------------------------------------------------------------------------------------------


def _gib(n: float) -> str:
    return f"{n / GiB:.2f} GiB" if n < 10 * GiB else f"{n / GiB:.1f} GiB"


def _predicted(summary: dict[str, Any], prefix: str) -> str:
    value, error = summary.get(f"{prefix}_predicted_s"), summary.get(f"{prefix}_error")
    if value is None:
        return "-"
    return f"{value:.2f}" if error is None else f"{value:.2f} ({error:+.0%})"


def _opt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _mib(n: float) -> str:
    return f"{n / MiB:,.0f}"


def _checkouts(start: str | None, end: str | None) -> str:
    return f"{end}" if start in (None, end) else f"{start} at start, {end} at end (others committed meanwhile)"


def render(report: dict[str, Any]) -> str:
    lines: list[str] = []
    m = report["machine"]
    runs = report["runs"]
    lines.append(
        f"Whole commands in fresh processes, page cache warm, medians of {runs} runs. Machine: {m['nproc']} CPUs, "
        f"{m['cpu']}, kernel {m['kernel']}, Python {m['python']}, checkout "
        f"{_checkouts(report.get('checkout_start'), m['vhdcore']['checkout_rev'])} "
        f"(native module built {m['vhdcore']['module_built']}), {m.get('zstd')}, {m.get('qemu_img')}; load average "
        f"{report['loadavg_start']} at start, {m.get('loadavg_end')} at end."
    )
    lines.append("")
    if report["disks"]:
        lines.append(
            "| disk | virtual | allocated | ours s | naive s | speedup | Chain.compress s | orchestration | "
            "upload share | predicted s (error) | peak RSS MiB |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for d in report["disks"]:
            s, info = d["summary"], d["disk"]
            predicted = _predicted(s, "estimate")
            lines.append(
                f"| {info['name']} | {_gib(info['virtual_size'])} | {_gib(info['allocated_bytes'])} | "
                f"{s['ours_s']:.2f} | {s['naive_s']:.2f} | {s['speedup']:.2f}x | {s['compress_s']:.2f} | "
                f"{s['orchestration']:.2f}x | {s['upload_share']:.1%} | {predicted} | {_mib(s['ours_max_rss'])} |"
            )
        lines.append("")
        lines.append(
            "Where the time goes (medians, seconds): from the fork to the job's first state (interpreter, imports, "
            "engine start), the job's states from its manifest's history, from its last state (ACTIVE) to the exit, "
            "the naive steps, and the sizes."
        )
        lines.append("")
        lines.append(
            "| disk | start → QUEUED | QUEUED | SAVING | UPLOADING | upload_seconds | ACTIVE → exit | "
            "job's own ETA s | estimate's compress s (error vs Chain.compress) | virtual MB/s | "
            "naive convert / zstd / cp | "
            "image MB (ours / naive / Chain.compress / estimate) | peak RSS MiB naive / Chain.compress | "
            "others' CPU (max) |"
        )
        lines.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for d in report["disks"]:
            s, t = d["summary"], d["summary"]["ours_timings"]
            eta = s["manifest_predicted_s"]
            steps = s["naive_steps"]
            lines.append(
                f"| {d['disk']['name']} | {_opt(s.get('before_first_state_s'))} | {t.get('QUEUED', 0):.2f} | "
                f"{t.get('SAVING', 0):.2f} | {t.get('UPLOADING', 0):.2f} | {t.get('upload_seconds', 0):.2f} | "
                f"{_opt(s.get('after_last_state_s'))} | "
                f"{'-' if eta is None else f'{eta:.2f}'} | {_predicted(s, 'estimate_compress')} | "
                f"{s['virtual_mbps']:,.0f} | "
                f"{steps['convert']:.2f} / {steps['zstd']:.2f} / {steps['cp']:.2f} | "
                f"{s['ours_size'] / MB:,.1f} / {s['naive_size'] / MB:,.1f} / {s['compress_size'] / MB:,.1f} / "
                f"{s['estimate_size'] / MB:,.1f} | {_mib(s['naive_max_rss'])} / {_mib(s['compress_max_rss'])} | "
                f"{s['foreign_share_max']:.0%} |"
            )
        lines.append("")
    if report["startup"]:
        lines.append(f"CLI start (fresh processes, {report['startup_runs']} runs each):")
        lines.append("")
        lines.append("| command | median s | min s | peak RSS MiB | others' CPU (max) |")
        lines.append("|---|---:|---:|---:|---:|")
        for row in report["startup"]:
            lines.append(
                f"| `{row['command']}` | {row['median_s']:.3f} | {row['min_s']:.3f} | {_mib(row['max_rss'])} | "
                f"{row['foreign_share_max']:.0%} |"
            )
        lines.append("")
    if report["acceptance"]:
        lines.append("Issue 13's acceptance, as far as this run measures it:")
        lines.append("")
        lines.append("| check | value | target | met |")
        lines.append("|---|---:|---|---|")
        for c in report["acceptance"]:
            lines.append(f"| {c['check']} | {c['value']} | {c['target']} | {'yes' if c['met'] else '**NO**'} |")
        lines.append("")
    for d in report["disks"]:
        info = d["disk"]
        kinds = info.get("bytes_by_kind") or {}
        total = sum(kinds.values()) or 1
        mix = ", ".join(f"{k} {v / total:.0%}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
        odd = [r for r in d["ours"] if not r["stdout_pure_json"]]
        leftovers = max(r["staging_leftover_bytes"] for r in d["ours"])
        lines.append(
            f"- {info['name']}: {info['allocated_blocks']} blocks in {info['extents']} extents, file "
            f"{info['file_size'] / MB:,.0f} MB ({'cached' if info['cached'] else 'built'}, build "
            f"{info['build_seconds']} s); {mix}; ours' stdout "
            + ("pure JSON" if not odd else f"not pure JSON in {len(odd)} of {len(d['ours'])} runs")
            + (f"; {leftovers / MB:,.1f} MB left in store/staging after a run" if leftovers else "")
            + (
                f"; {d['summary']['runs_redone']} runs redone (others used the CPUs)"
                if d["summary"]["runs_redone"]
                else ""
            )
            + "".join(
                f"; {kind} run {i + 1} kept with others at {r['foreign_share']:.0%} of the CPUs"
                for kind in ("estimate", "ours", "naive", "compress")
                for i, r in enumerate(d[kind])
                if r["foreign_share"] > report.get("max_foreign", 1.0)
            )
            + "; runs (min-max s): "
            + ", ".join(
                f"{label} {min(r['seconds'] for r in d[kind]):.2f}-{max(r['seconds'] for r in d[kind]):.2f}"
                for kind, label in (("ours", "ours"), ("naive", "naive"), ("compress", "Chain.compress"))
            )
            + (f"; checkout {d['summary']['checkout']}" if d["summary"].get("checkout") else "")
        )
    lines.append("")
    lines.append(
        "ours = `imaging image create --disk D --wait --json`; naive = `qemu-img convert -f vpc -O raw` + "
        f"`zstd -q -3 -T{CORES}` + `cp` into a folder; Chain.compress timed in-process around the call; speedup = "
        "naive / ours; orchestration = ours / Chain.compress; upload share = the manifest's UPLOADING / ours; "
        "predicted = what `imaging vhd estimate D --json` (a fresh process before the job) says the job will take: "
        "its `job.seconds` (the whole command), or its `predicted_seconds` (the compressor) when it gives no job, "
        "with the error against ours; others' CPU = CPU "
        "time the rest of the machine used during a run, as a share of all its CPUs (from /proc/stat, the command's "
        "own CPU time subtracted): the worst run of the disk. "
        f"Whole run: {report['seconds']:.0f} s."
    )
    return "\n".join(lines)


def select(args: argparse.Namespace) -> list[DiskSpec]:
    chosen = DISKS
    if args.only:
        tokens = [t.strip() for t in args.only.split(",") if t.strip()]
        chosen = [d for d in chosen if any(t in d.name for t in tokens)]
    if args.sizes:
        sizes = {float(s.lower().removesuffix("g")) for s in args.sizes.split(",") if s.strip()}
        chosen = [d for d in chosen if d.size / GiB in sizes]
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", help="disks whose name contains one of these (comma-separated): e.g. 1g, mixed-8g")
    parser.add_argument("--sizes", help="disks of these virtual sizes in GiB (comma-separated): e.g. 1,8")
    parser.add_argument("--runs", type=int, default=3, help="runs of each pipeline per disk; medians (default 3)")
    parser.add_argument("--startup-runs", type=int, default=5, help="fresh runs of each start-up command (default 5)")
    parser.add_argument("--no-startup", action="store_true", help="skip the CLI start-up table")
    parser.add_argument("--build-only", action="store_true", help="build (or find) the disks and stop")
    parser.add_argument(
        "--idle-threshold",
        type=float,
        default=0.15,
        help="before each run, wait until the rest of the machine uses at most this share of the CPUs (default 0.15)",
    )
    parser.add_argument(
        "--idle-timeout", type=float, default=120.0, help="wait at most this long for it, then run (0: never wait)"
    )
    parser.add_argument(
        "--max-foreign",
        type=float,
        default=0.25,
        help="redo a run during which the rest of the machine used more than this share of the CPUs (default 0.25)",
    )
    parser.add_argument("--retries", type=int, default=3, help="at most this many times (default 3; 0: never)")
    parser.add_argument("--workdir", type=Path, default=DEFAULT_WORKDIR)
    parser.add_argument("--json", action="store_true", help="print every figure as one JSON document")
    parser.add_argument("--save-json", type=Path, metavar="FILE", help="also write the JSON document to FILE")
    parser.add_argument("--from-json", type=Path, metavar="FILE", help="print the tables of a saved JSON document")
    args = parser.parse_args(argv)
    if args.from_json:
        print(render(json.loads(args.from_json.read_text())))
        return 0
    if not os.access(TIME, os.X_OK):
        sys.exit(f"error: {TIME} not found (Debian package `time`): it measures the commands' peak RSS")
    for tool in ("qemu-img", "zstd", "cat", "cp"):
        if not shutil.which(tool):
            sys.exit(f"error: {tool} not found (qemu-img: Debian qemu-utils)")
    specs = select(args)
    if not specs:
        sys.exit("error: --only/--sizes selected no disk; disks: " + ", ".join(d.name for d in DISKS))
    workdir = args.workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    loadavg_start = _loadavg()
    checkout_start = checkout_rev()
    started = time.perf_counter()
    pools: list[Pools] = []

    def get_pools() -> Pools:
        if not pools:
            log("reading and synthesizing the data pools")
            pools.append(Pools())
            log(f"pools ready: {pools[0].sources}")
        return pools[0]

    infos = [build_disk(spec, workdir, get_pools) for spec in specs]
    pools.clear()
    if args.build_only:
        return 0
    data_dir = workdir / "data"
    if data_dir.exists():
        shutil.rmtree(data_dir)  # a fresh store and state for this run
    idle = Quiet(args.idle_threshold, args.idle_timeout, args.max_foreign, args.retries)
    disks = [bench_disk(info, workdir, args.runs, idle) for info in infos]
    startup_disk = next((i["path"] for i in infos if i["params"]["name"] == "mixed-1g"), infos[0]["path"])
    startup = [] if args.no_startup else bench_startup(startup_disk, workdir, args.startup_runs, idle)
    machine = machine_info(workdir)
    zstd_version = subprocess.run(["zstd", "--version"], capture_output=True, text=True, check=False).stdout.strip()
    machine["zstd"] = zstd_version.split(",")[0].removeprefix("*** ").strip() or None
    report = {
        "machine": machine,
        "loadavg_start": loadavg_start,
        "checkout_start": checkout_start,
        "runs": args.runs,
        "max_foreign": args.max_foreign,
        "startup_runs": args.startup_runs,
        "commands": {
            "ours": [IMAGING, "image", "create", "--disk", "D", "--wait", "--json"],
            "estimate": [IMAGING, "vhd", "estimate", "D", "--json"],
            "naive": [
                "qemu-img convert -f vpc -O raw D raw",
                f"zstd -q -3 -T{CORES} raw -o raw.zst",
                "cp raw.zst store/",
            ],
            "compress": [PYTHON, "-c", COMPRESS_SCRIPT],
        },
        "disks": disks,
        "startup": startup,
        "acceptance": acceptance(disks, startup),
        "seconds": time.perf_counter() - started,
    }
    if args.save_json:
        args.save_json.write_text(json.dumps(report, indent=2))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print(render(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
