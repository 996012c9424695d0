"""End-to-end imaging throughput (issue 5): the whole workflow on the embedded default (the real ASL on the local
engine, file store, SQLite) against the naive pipeline on the same chain, and against the "2 minutes per GB" rule.

The chain is bench_vhd's depth-3 mixed chain (2 GiB virtual by default, cached in the work directory). Rows:
- workflow: `--disk` image of the chain (coalesce skipped: the chain is imaged read-only), from the start of the
  execution to the image ACTIVE (snapshot, estimate, compress Map, upload with part copies, manifest with hashes);
- naive: flatten to raw (`Chain.export`), `zstd -3 -T<cores>`, copy the result into the store;
- rule: 120 s per GB of virtual disk.
Throughput is virtual bytes per second, and live bytes (allocated in the chain) per second.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_vhd import MB, Corpus, GiB, build_chain3, log, machine_info

import vhdcore

CORES = len(os.sched_getaffinity(0))
RULE_SECONDS_PER_GB = 120.0


def run_workflow(leaf: Path, workdir: Path) -> dict[str, Any]:
    store = workdir / "e2e-store"
    os.environ["IMAGING_STORE"] = store.as_uri()
    os.environ["IMAGING_STATE"] = f"sqlite:///{workdir / 'e2e-state.sqlite3'}"
    from statemachine.local import LocalImaging

    job = f"bench-{uuid.uuid4().hex[:12]}"
    request = {"job_id": job, "image_id": f"img-{job}", "tenant": "bench", "name": "bench", "disk": str(leaf)}
    with LocalImaging() as workflow:
        started = time.perf_counter()
        result = workflow.run(request, timeout_s=3600)
        seconds = time.perf_counter() - started
    if not result.succeeded:
        raise SystemExit(f"the workflow failed: {result.error}: {result.cause}")
    manifest = json.loads((store / "images" / f"img-{job}" / "manifest.json").read_text())
    shutil.rmtree(store / "images" / f"img-{job}")
    return {"seconds": seconds, "manifest": manifest}


def run_naive(leaf: Path, workdir: Path) -> dict[str, Any]:
    raw = workdir / "naive.raw"
    packed = workdir / "naive.raw.zst"
    stored = workdir / "naive-store" / "image.raw.zst"
    stored.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    vhdcore.open_chain(str(leaf)).export(str(raw), "raw")
    flattened = time.perf_counter()
    subprocess.run(["zstd", "-q", "-f", "-3", f"-T{CORES}", str(raw), "-o", str(packed)], check=True)
    compressed = time.perf_counter()
    shutil.copyfile(packed, stored)
    os.sync()
    done = time.perf_counter()
    size = stored.stat().st_size
    for path in (raw, packed, stored):
        path.unlink()
    return {
        "seconds": done - started,
        "flatten_s": flattened - started,
        "zstd_s": compressed - flattened,
        "copy_s": done - compressed,
        "size": size,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--runs", type=int, default=2, help="runs of each pipeline; the best is kept")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/cloud-imaging-bench"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("IMAGING_DATA_DIR", str(args.workdir / "e2e-data"))
    args.workdir.mkdir(parents=True, exist_ok=True)
    chain = build_chain3(args.workdir, int(args.size_gib * GiB), args.seed, Corpus.load())
    leaf = Path(chain["dir"]) / "snap2.vhd"
    opened = vhdcore.open_chain(str(leaf))
    virtual = opened.virtual_size
    live = opened.estimate().allocated_bytes
    subprocess.run(["cat", *[layer.path for layer in opened.layers]], stdout=subprocess.DEVNULL, check=True)

    workflow_runs, naive_runs = [], []
    for run in range(args.runs):
        log(f"workflow run {run + 1}/{args.runs}")
        workflow_runs.append(run_workflow(leaf, args.workdir))
        log(f"naive run {run + 1}/{args.runs}")
        naive_runs.append(run_naive(leaf, args.workdir))
    best = min(workflow_runs, key=lambda r: r["seconds"])
    naive = min(naive_runs, key=lambda r: r["seconds"])
    rule = virtual / 1e9 * RULE_SECONDS_PER_GB
    manifest = best["manifest"]
    report = {
        "machine": machine_info(args.workdir),
        "virtual_bytes": virtual,
        "live_bytes": live,
        "workflow": {
            "seconds": best["seconds"],
            "all_seconds": [r["seconds"] for r in workflow_runs],
            "compressed_bytes": manifest["compressed_size"],
            "timings": manifest["timings"],
            "parts": manifest["part_count"],
            "parts_copied": manifest["parts_copied"],
        },
        "naive": {**naive, "all_seconds": [r["seconds"] for r in naive_runs]},
        "rule_seconds": rule,
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(
        f"End-to-end imaging of a {virtual / GiB:g} GiB depth-3 mixed chain ({live / GiB:.2f} GiB live), {CORES} cores"
    )
    print()
    print("| pipeline | seconds | virtual MB/s | live MB/s | image bytes | vs rule |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, seconds, size in (
        ("workflow (embedded default)", best["seconds"], manifest["compressed_size"]),
        (f"naive (export raw, zstd -3 -T{CORES}, copy)", naive["seconds"], naive["size"]),
        ("rule: 2 minutes per GB", rule, None),
    ):
        print(
            f"| {name} | {seconds:.2f} | {virtual / seconds / MB:.0f} | {live / seconds / MB:.0f} | "
            f"{size if size is not None else '-'} | {rule / seconds:.1f}x |"
        )
    print()
    print(f"workflow steps (s): {json.dumps({k: round(v, 2) for k, v in manifest['timings'].items()})}")
    print(f"naive steps (s): flatten {naive['flatten_s']:.2f}, zstd {naive['zstd_s']:.2f}, copy {naive['copy_s']:.2f}")


if __name__ == "__main__":
    main()
