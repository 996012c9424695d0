"""Benchmark of the image compressor and the size estimate (issue 3) against `zstd`, in one run on the same data.

Rows: vhdcore's compressor (`Chain.compress`, level 3, all cores) against `zstd -3 -T<cores>` of the flattened raw
disk (input throughput and output size), the same on already-compressed data, and the estimate's accuracy and cost
over generated disks of different mixes (the truth is the size the compressor then produces).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import vhdcore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_vhd import (
    BLOCK,
    MB,
    Corpus,
    DataGen,
    GiB,
    MiB,
    _write_run,
    best_of,
    build_chain3,
    log,
    machine_info,
)

CORES = len(os.sched_getaffinity(0))

# The mixes of the accuracy table: weights of (zeros, text, elf, compressed, random) and the allocated share.
MIXES: list[tuple[str, dict[str, float], float, int]] = [
    ("mixed", {"zeros": 0.15, "text": 0.25, "elf": 0.25, "compressed": 0.15, "random": 0.20}, 0.6, 512),
    ("text-heavy", {"zeros": 0.05, "text": 0.80, "elf": 0.10, "compressed": 0.0, "random": 0.05}, 0.7, 256),
    ("elf-heavy", {"zeros": 0.10, "text": 0.10, "elf": 0.75, "compressed": 0.05, "random": 0.0}, 0.7, 512),
    ("compressed", {"zeros": 0.0, "text": 0.05, "elf": 0.05, "compressed": 0.85, "random": 0.05}, 0.8, 256),
    ("random", {"zeros": 0.0, "text": 0.0, "elf": 0.0, "compressed": 0.1, "random": 0.9}, 0.5, 256),
    ("zero-heavy", {"zeros": 0.60, "text": 0.20, "elf": 0.10, "compressed": 0.05, "random": 0.05}, 0.8, 1024),
    ("sparse-text", {"zeros": 0.10, "text": 0.60, "elf": 0.30, "compressed": 0.0, "random": 0.0}, 0.2, 2048),
    ("even", {"zeros": 0.2, "text": 0.2, "elf": 0.2, "compressed": 0.2, "random": 0.2}, 0.5, 1024),
]


def build_disk(
    workdir: Path, name: str, size: int, mix: dict[str, float], allocated: float, seed: int, corpus: Corpus
) -> Path:
    """A dynamic VHD with runs of allocated blocks filled with `mix`, plus a snapshot with small rewrites."""
    key = json.dumps(
        {"v": 1, "size": size, "mix": mix, "allocated": allocated, "seed": seed, "c": corpus.fingerprint},
        sort_keys=True,
    )
    folder = workdir / f"image-{name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    leaf = folder / "leaf.vhd"
    if (folder / "key.json").is_file() and (folder / "key.json").read_text() == key and leaf.is_file():
        return leaf
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    rng = random.Random(seed)
    gen = DataGen(corpus, rng)
    gen.kinds = [k for k, w in mix.items() if w > 0]
    gen.weights = [w for w in mix.values() if w > 0]
    base = folder / "base.vhd"
    vhdcore.create(str(base), size)
    blocks = size // BLOCK
    pos = 0
    while pos < blocks:
        run = min(rng.randint(1, 24), blocks - pos)
        if rng.random() < allocated:
            _write_run(base, pos * BLOCK, gen.fill(run * BLOCK))
        pos += run
    vhdcore.snapshot(str(base), str(leaf))
    for _ in range(max(1, blocks // 16)):
        length = rng.choice([512, 4096, 65536, BLOCK])
        _write_run(leaf, rng.randrange(0, size - length), gen.fill(length))
    (folder / "key.json").write_text(key)
    return leaf


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def time_zstd(raw: Path, out: Path, level: int, runs: int, durable: bool = False) -> tuple[float, int]:
    """`zstd -L -T<cores>` of the raw disk into `out`; with `durable`, the output's fsync is inside the timing."""

    def run() -> None:
        with out.open("wb") as f:
            subprocess.run(["zstd", f"-{level}", f"-T{CORES}", "-q", "-c", str(raw)], stdout=f, check=True)
        if durable:
            fsync_file(out)

    best, _ = best_of(runs, run, after=os.sync)  # write-back of the output lands outside the timings
    return best, out.stat().st_size


def time_ours(
    chain: vhdcore.Chain, out: Path, level: int, runs: int, durable: bool = False
) -> tuple[float, vhdcore.ImageStats]:
    """`Chain.compress` into `out`; with `durable`, the output's fsync is inside the timing."""
    results: list[vhdcore.ImageStats] = []

    def run() -> None:
        results.append(chain.compress(str(out), level=level))
        if durable:
            fsync_file(out)

    best, _ = best_of(runs, run, after=os.sync)
    return best, results[-1]


def compress_rows(name: str, leaf: Path, workdir: Path, level: int, runs: int) -> dict[str, Any]:
    chain = vhdcore.open_chain(str(leaf))
    raw = workdir / f"{name}.raw"
    chain.export(str(raw), "raw")
    subprocess.run(["cat", str(raw), *[layer.path for layer in chain.layers]], stdout=subprocess.DEVNULL, check=True)
    ours_s, stats = time_ours(chain, workdir / f"{name}.vhd.zst", level, runs)
    zstd_s, zstd_bytes = time_zstd(raw, workdir / f"{name}.raw.zst", level, runs)
    # Until the output is on disk: our image is appended with O_DIRECT, zstd's output sits in the page cache.
    ours_durable_s, _ = time_ours(chain, workdir / f"{name}.vhd.zst", level, runs, durable=True)
    zstd_durable_s, _ = time_zstd(raw, workdir / f"{name}.raw.zst", level, runs, durable=True)
    # Correctness of what was timed: zstd -d of our image, read by qemu-img, is the flattened disk.
    check = subprocess.run(
        ["zstd", "-d", "-q", "-c", str(workdir / f"{name}.vhd.zst")], capture_output=True, check=True
    )
    vhd = workdir / f"{name}.check.vhd"
    vhd.write_bytes(check.stdout)
    subprocess.run(
        ["qemu-img", "convert", "-f", "vpc", "-O", "raw", str(vhd), str(workdir / f"{name}.check.raw")], check=True
    )
    same = subprocess.run(["cmp", "-s", str(raw), str(workdir / f"{name}.check.raw")], check=False).returncode == 0
    for path in [raw, vhd, workdir / f"{name}.check.raw", workdir / f"{name}.raw.zst", workdir / f"{name}.vhd.zst"]:
        path.unlink(missing_ok=True)
    return {
        "name": name,
        "virtual_size": chain.virtual_size,
        "ours_seconds": ours_s,
        "ours_mbps": chain.virtual_size / ours_s / MB,
        "ours_bytes": stats.compressed_bytes,
        "zstd_seconds": zstd_s,
        "zstd_mbps": chain.virtual_size / zstd_s / MB,
        "zstd_bytes": zstd_bytes,
        "speed_ratio": zstd_s / ours_s,
        "ours_durable_seconds": ours_durable_s,
        "zstd_durable_seconds": zstd_durable_s,
        "size_ratio": stats.compressed_bytes / zstd_bytes,
        "verified": same,
    }


def seed_of(k: int) -> int | None:
    """The estimate's seed for the k-th run of a mix: its default first, then seeds spread by a prime."""
    return None if k == 0 else k * 7919 + 1


def accuracy_rows(workdir: Path, corpus: Corpus, level: int, seeds: int) -> list[dict[str, Any]]:
    rows = []
    for i, (name, mix, allocated, size_mib) in enumerate(MIXES):
        leaf = build_disk(workdir, name, size_mib * MiB, mix, allocated, 100 + i, corpus)
        chain = vhdcore.open_chain(str(leaf))
        subprocess.run(["cat", *[layer.path for layer in chain.layers]], stdout=subprocess.DEVNULL, check=True)
        started = time.perf_counter()
        est = chain.estimate(level=level)
        est_s = time.perf_counter() - started
        out = workdir / f"acc-{name}.vhd.zst"
        stats = chain.compress(str(out), level=level)
        out.unlink()
        truth = stats.compressed_bytes
        # The same disk estimated with other seeds: the estimator's spread, not one draw's luck.
        others = [chain.estimate(level=level, seed=seed_of(k)) for k in range(1, seeds)]
        errors = [(e.compressed_bytes - truth) / truth for e in [est, *others]]
        rows.append(
            {
                "name": name,
                "virtual_size": chain.virtual_size,
                "truth": truth,
                "estimate": est.compressed_bytes,
                "low": est.low,
                "high": est.high,
                "error": errors[0],
                "in_range": est.low <= truth <= est.high,
                "estimate_seconds": est_s,
                "compress_seconds": stats.seconds,
                "predicted_seconds": est.predicted_seconds,
                "seed_errors": errors,
                "seeds_in_range": sum(e.low <= truth <= e.high for e in [est, *others]),
            }
        )
        log(f"accuracy {name}: error {rows[-1]['error']:+.2%}, in range {rows[-1]['in_range']}")
    return rows


def cpu_seconds(fn: Callable[[], object]) -> float:
    """CPU time (user and system, every thread of this process) that `fn` takes: on a shared machine it moves
    less with the others' load than wall time does."""
    started = time.process_time()
    fn()
    return time.process_time() - started


def cost_row(name: str, leaf: Path, level: int) -> dict[str, Any]:
    chain = vhdcore.open_chain(str(leaf))
    subprocess.run(["cat", *[layer.path for layer in chain.layers]], stdout=subprocess.DEVNULL, check=True)
    est_s, _ = best_of(3, lambda: chain.estimate(level=level))
    est_cpu = min(cpu_seconds(lambda: chain.estimate(level=level)) for _ in range(3))
    est = chain.estimate(level=level)
    out = leaf.parent / "cost.vhd.zst"
    stats: list[vhdcore.ImageStats] = []
    compress_cpu = cpu_seconds(lambda: stats.append(chain.compress(str(out), level=level)))
    out.unlink()
    return {
        "name": name,
        "virtual_size": chain.virtual_size,
        "estimate_seconds": est_s,
        "compress_seconds": stats[0].seconds,
        "fraction": est_s / stats[0].seconds,
        "estimate_cpu_seconds": est_cpu,
        "compress_cpu_seconds": compress_cpu,
        "cpu_fraction": est_cpu / compress_cpu,
        "sampled_bytes": est.sampled_bytes,
        "predicted_seconds": est.predicted_seconds,
    }


def met(ok: bool) -> str:
    return "yes" if ok else "**NO**"


def render(report: dict[str, Any]) -> str:
    m = report["machine"]
    lines = [
        f"Machine: {m['nproc']} CPUs, {m['cpu']}, {m['ram_bytes'] / GiB:.1f} GiB RAM, kernel {m['kernel']}; "
        f"zstd {report['zstd_version']}; vhdcore checkout {m['vhdcore']['checkout_rev']}; "
        f"load average {report['load_start']} at start, {m['loadavg_end']} at end",
        "",
        "| benchmark | ours | peer | ratio | target | met |",
        "|---|---|---|---|---|---|",
    ]
    for c in report["compress"]:
        lines.append(
            f"| compress {c['name']} ({c['virtual_size'] / GiB:g} GiB), level 3 | {c['ours_mbps']:,.0f} MB/s "
            f"({c['ours_seconds']:.2f} s) | zstd -3 -T{CORES} of the raw disk: {c['zstd_mbps']:,.0f} MB/s "
            f"({c['zstd_seconds']:.2f} s) | {c['speed_ratio']:.2f}× | ≥ 1.5× | {met(c['speed_ratio'] >= 1.5)} |"
        )
        lines.append(
            f"| compress {c['name']}, output fsynced in the timing | "
            f"{c['virtual_size'] / c['ours_durable_seconds'] / MB:,.0f} MB/s ({c['ours_durable_seconds']:.2f} s) | "
            f"zstd -3 -T{CORES}: {c['virtual_size'] / c['zstd_durable_seconds'] / MB:,.0f} MB/s "
            f"({c['zstd_durable_seconds']:.2f} s) | {c['zstd_durable_seconds'] / c['ours_durable_seconds']:.2f}× | "
            "(info) | — |"
        )
        lines.append(
            f"| output size, {c['name']} | {c['ours_bytes']:,} B | zstd -3: {c['zstd_bytes']:,} B | "
            f"{c['size_ratio']:.4f} | ≤ 1.01 | {'yes' if c['size_ratio'] <= 1.01 else '**NO**'} |"
        )
    for c in report["compress"]:
        if c["name"] == "already-compressed":
            lines.append(
                f"| already-compressed data throughput | {c['ours_mbps']:,.0f} MB/s | — | — | ≥ 2,000 MB/s | "
                f"{'yes' if c['ours_mbps'] >= 2000 else '**NO**'} |"
            )
    acc = report["accuracy"]
    if not acc:
        lines.append("| estimate | not in this build (issue 3, in progress) | — | — | — | — |")
    if acc:
        worst = max((abs(r["error"]) for r in acc), default=0.0)
        lines.append(
            f"| estimate worst error over {len(acc)} mixes | {worst:.2%} | (the size then produced) | — | ≤ 2% | "
            f"{'yes' if worst <= 0.02 else '**NO**'} |"
        )
        inside = sum(r["in_range"] for r in acc)
        lines.append(
            f"| truth inside the low-high range | {inside} of {len(acc)} | — | — | all | "
            f"{'yes' if inside == len(acc) else '**NO**'} |"
        )
    for c in report["cost"]:
        target = 0.15 if c["virtual_size"] <= 2 * GiB else 0.02
        lines.append(
            f"| estimate cost, {c['name']} | {c['estimate_seconds'] * 1e3:.0f} ms | full compression "
            f"{c['compress_seconds']:.2f} s | {c['fraction']:.1%} | ≤ {target:.0%} | "
            f"{'yes' if c['fraction'] <= target else '**NO**'} |"
        )
        lines.append(
            f"| estimate CPU, {c['name']} | {c['estimate_cpu_seconds'] * 1e3:.0f} ms CPU | full compression "
            f"{c['compress_cpu_seconds']:.2f} s CPU | {c['cpu_fraction']:.1%} | ≤ {target:.0%} | "
            f"{'yes' if c['cpu_fraction'] <= target else '**NO**'} |"
        )
    lines += [
        "",
        "| mix | virtual | true size | estimate | error | low-high | estimate s | compress s | predicted s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in acc:
        lines.append(
            f"| {r['name']} | {r['virtual_size'] / MiB:.0f} MiB | {r['truth']:,} | {r['estimate']:,} | "
            f"{r['error']:+.2%} | {r['low']:,}–{r['high']:,} {'✓' if r['in_range'] else '✗'} | "
            f"{r['estimate_seconds']:.3f} | {r['compress_seconds']:.3f} | {r['predicted_seconds']:.3f} |"
        )
    seeds = report["seeds"]
    if acc and seeds > 1:
        lines += [
            "",
            f"Estimate over {seeds} seeds per mix (the first is the default seed above):",
            "",
            "| mix | mean error | sd | worst | min | max | truth in range |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in acc:
            errs = r["seed_errors"]
            mean = sum(errs) / len(errs)
            sd = (sum((e - mean) ** 2 for e in errs) / max(len(errs) - 1, 1)) ** 0.5
            lines.append(
                f"| {r['name']} | {mean:+.2%} | {sd:.2%} | {max(abs(e) for e in errs):.2%} | {min(errs):+.2%} | "
                f"{max(errs):+.2%} | {r['seeds_in_range']} of {len(errs)} |"
            )
        every = [e for r in acc for e in r["seed_errors"]]
        rms = (sum(e * e for e in every) / len(every)) ** 0.5
        within = sum(abs(e) <= 0.02 for e in every)
        inside = sum(r["seeds_in_range"] for r in acc)
        lines.append(
            f"| all {len(every)} estimates | rms {rms:.2%} | — | {max(abs(e) for e in every):.2%} | — | — | "
            f"{inside} of {len(every)}; {within} of {len(every)} within 2% |"
        )
    verified = all(c["verified"] for c in report["compress"])
    lines.append("")
    lines.append(
        f"Throughput = virtual disk bytes per second (MB = 10^6 B), best of {report['runs']}, page cache warm; every "
        "timed image was checked (zstd -d, qemu-img convert, cmp with the raw disk): "
        f"{'ok' if verified else 'FAILED'}. "
        f"Whole run: {report['total_seconds']:.0f} s."
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--workdir", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "cloud-imaging-bench")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--level", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--seeds", type=int, default=1, help="estimate each accuracy mix with this many seeds (the default first)"
    )
    parser.add_argument(
        "--only",
        choices=["compress", "estimate"],
        help="run only the compressor rows (compress) or only the estimate rows (estimate)",
    )
    args = parser.parse_args()
    run_compress = args.only != "estimate"
    started = time.perf_counter()
    load_start = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    args.workdir.mkdir(parents=True, exist_ok=True)
    corpus = Corpus.load()
    chain3 = build_chain3(args.workdir, 2 * GiB, 1, corpus)
    compressed_mix = {"zeros": 0.0, "text": 0.0, "elf": 0.0, "compressed": 0.7, "random": 0.3}
    already = build_disk(args.workdir, "already-compressed", GiB, compressed_mix, 1.0, 7, corpus)
    has_estimate = hasattr(vhdcore.Chain, "estimate") and args.only != "compress"
    one_gib = build_disk(args.workdir, "mixed-1g", GiB, MIXES[0][1], 0.8, 8, corpus) if has_estimate else None
    # 32 GiB virtual, sparse but realistic: ~10% allocated, the usual mix.
    big = build_disk(args.workdir, "sparse-32g", 32 * GiB, MIXES[0][1], 0.10, 9, corpus) if has_estimate else None
    report: dict[str, Any] = {
        "runs": args.runs,
        "seeds": args.seeds,
        "load_start": load_start,
        "zstd_version": subprocess.run(["zstd", "-V"], capture_output=True, text=True).stdout.strip(),
        "compress": [
            compress_rows(
                "depth-3 mixed chain", Path(chain3["dir"]) / chain3["leaf"], args.workdir, args.level, args.runs
            ),
            compress_rows("already-compressed", already, args.workdir, args.level, args.runs),
        ]
        if run_compress
        else [],
    }
    report["accuracy"] = accuracy_rows(args.workdir, corpus, args.level, max(args.seeds, 1)) if has_estimate else []
    report["cost"] = (
        [
            cost_row("1 GiB mixed disk (80% allocated)", one_gib, args.level),
            cost_row("32 GiB sparse-but-realistic disk (10% allocated)", big, args.level),
        ]
        if one_gib is not None and big is not None
        else []
    )
    report["machine"] = machine_info(args.workdir)
    report["total_seconds"] = time.perf_counter() - started
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
