"""Benchmark of the resumable parallel uploader (issue 4) against boto3's `upload_file`, on one moto server.

A moto server runs in its own process on loopback; each upload runs in a fresh child process so that its peak RSS
is its own. Rows: our uploader (parts of --part-size, --concurrency threads, CRC32C per part, verification after
completion) and boto3's `upload_file` with its default TransferConfig (8 MiB parts, 10 threads), on the same file
of seeded random-ish data (incompressible, like a compressed image). Printed: throughput of each and their ratio,
and our peak memory against the bound concurrency * part size.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
import subprocess
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

MiB = 1024**2
GiB = 1024**3
BUCKET = "bench-upload"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/dev/null",
    "AWS_SHARED_CREDENTIALS_FILE": "/dev/null",
}


def log(message: str) -> None:
    print(f"[bench-upload {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def make_file(path: Path, size: int, seed: int) -> None:
    """Seeded incompressible data with a few zero runs, written in 64 MiB blocks (kept between runs)."""
    marker = path.with_suffix(".json")
    identity = json.dumps({"size": size, "seed": seed})
    if path.exists() and marker.exists() and marker.read_text() == identity:
        return
    rng = random.Random(seed)
    with open(path, "wb") as out:
        left = size
        while left:
            block = bytearray(rng.randbytes(min(64 * MiB, left)))
            zero_at = rng.randrange(0, len(block))
            block[zero_at : zero_at + 1 * MiB] = bytes(len(block[zero_at : zero_at + 1 * MiB]))
            out.write(block)
            left -= len(block)
        out.flush()
        os.fsync(out.fileno())
    marker.write_text(identity)


def serve_moto(port: int, control: Connection) -> None:
    """Child process: a moto server until told to stop."""
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    control.send("ready")
    control.recv()
    server.stop()


def memory_status(field: str) -> int:
    """A /proc/self/status figure in bytes: VmRSS (now) or VmHWM (peak). Unlike ru_maxrss, VmHWM starts afresh at
    exec, so a child does not inherit its parent's peak."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(args: dict[str, Any]) -> dict[str, Any]:
    """Run one upload in this (fresh) process and report its timings and memory."""
    import boto3
    from botocore.config import Config

    client = boto3.client("s3", endpoint_url=args["endpoint"], config=Config(max_pool_connections=32))
    path = Path(args["path"])
    baseline = memory_status("VmRSS")
    started = time.perf_counter()
    extra: dict[str, Any] = {}
    if args["tool"] == "ours":
        from functions.storage import open_object_store
        from functions.storage.parts import plan_fixed_parts
        from functions.storage.upload import UploadOptions, upload_file

        store = open_object_store(f"s3://{BUCKET}", s3_client=client)
        parts = plan_fixed_parts(path.stat().st_size, args["part_size"])
        result = upload_file(store, path, args["key"], parts, options=UploadOptions(concurrency=args["concurrency"]))
        extra = {
            "parts": len(result.parts),
            "seconds_parts": result.seconds_parts,
            "seconds_complete": result.seconds_complete,
            "seconds_verify": result.seconds_verify,
            "verified_checksum": result.verification.checksum_crc32c,
            "verified_ranges": len(result.verification.sampled_ranges),
        }
    else:
        client.upload_file(str(path), BUCKET, args["key"])  # default TransferConfig
    seconds = time.perf_counter() - started
    peak = memory_status("VmHWM")
    head = client.head_object(Bucket=BUCKET, Key=args["key"])
    return {"seconds": seconds, "rss_baseline": baseline, "rss_peak": peak, "size": head["ContentLength"], **extra}


def run_child(args: dict[str, Any]) -> dict[str, Any]:
    env = {**os.environ, **CREDENTIALS, "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(args)], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{args['tool']} upload failed:\n{done.stderr}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def machine() -> dict[str, str]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        "unknown",
    )
    mem = next(
        line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")
    )
    return {
        "cpu": cpu,
        "cores": str(len(os.sched_getaffinity(0))),
        "ram_gib": f"{int(mem) / 1024**2:.1f}",
        "python": sys.version.split()[0],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2 * GiB, help="bytes of the uploaded file (default 2 GiB)")
    parser.add_argument("--part-size", type=int, default=16 * MiB)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--runs", type=int, default=1, help="uploads per tool; the best time is kept")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-upload"))
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        print(json.dumps(child(json.loads(options.child))))
        return 0

    options.workdir.mkdir(parents=True, exist_ok=True)
    path = options.workdir / f"image-{options.size}.bin"
    log(f"preparing {options.size / GiB:.2f} GiB of seeded data in {path}")
    make_file(path, options.size, options.seed)
    load_start = " ".join(Path("/proc/loadavg").read_text().split()[:3])

    from tests.support.moto_server import free_port

    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    control, remote = multiprocessing.Pipe()
    server = multiprocessing.get_context("spawn").Process(target=serve_moto, args=(port, remote), daemon=True)
    server.start()
    if not control.poll(60) or control.recv() != "ready":
        raise RuntimeError("the moto server did not start")
    os.environ.update(CREDENTIALS)
    import boto3

    admin = boto3.client("s3", endpoint_url=endpoint)
    admin.create_bucket(Bucket=BUCKET)

    rows: dict[str, dict[str, Any]] = {}
    try:
        for tool in ("ours", "boto3"):
            best: dict[str, Any] | None = None
            for run in range(options.runs):
                key = f"{tool}-{run}"
                log(f"{tool}: upload {run + 1}/{options.runs}")
                result = run_child(
                    {
                        "tool": tool,
                        "endpoint": endpoint,
                        "path": str(path),
                        "key": key,
                        "part_size": options.part_size,
                        "concurrency": options.concurrency,
                    }
                )
                if result["size"] != options.size:
                    raise RuntimeError(f"{tool} stored {result['size']} bytes, expected {options.size}")
                admin.delete_object(Bucket=BUCKET, Key=key)  # moto keeps objects in memory
                if best is None or result["seconds"] < best["seconds"]:
                    best = result
            assert best is not None
            rows[tool] = best
    finally:
        control.send("stop")
        server.join(timeout=60)

    load_end = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    info = machine()
    print(f"machine: {info['cpu']}, {info['cores']} cores, {info['ram_gib']} GiB RAM, Python {info['python']}")
    print(f"load average {load_start} at start, {load_end} at end")
    print(f"file: {options.size / GiB:.2f} GiB seeded incompressible data; moto server {endpoint} in its own process")
    print()
    print(f"{'uploader':<44} {'seconds':>8} {'MB/s':>8} {'peak RSS MiB':>13} {'RSS growth MiB':>15}")
    labels = {
        "ours": f"ours ({options.part_size // MiB} MiB parts x {options.concurrency}, CRC32C, verify)",
        "boto3": "boto3 upload_file (default TransferConfig)",
    }
    for tool, row in rows.items():
        growth = (row["rss_peak"] - row["rss_baseline"]) / MiB
        print(
            f"{labels[tool]:<44} {row['seconds']:>8.2f} {options.size / row['seconds'] / 1e6:>8.1f} "
            f"{row['rss_peak'] / MiB:>13.1f} {growth:>15.1f}"
        )
    ours, theirs = rows["ours"], rows["boto3"]
    print()
    print(
        f"throughput ratio ours / boto3: {theirs['seconds'] / ours['seconds']:.2f}x (ours including its verification)"
    )
    without_verify = ours["seconds"] - ours["seconds_verify"]
    print(f"throughput ratio ours without the verification step / boto3: {theirs['seconds'] / without_verify:.2f}x")
    parts_only = options.size / ours["seconds_parts"] / 1e6
    print(
        f"ours: parts {ours['seconds_parts']:.2f} s ({parts_only:.1f} MB/s), "
        f"complete {ours['seconds_complete']:.2f} s, "
        f"verify {ours['seconds_verify']:.2f} s (size, composite CRC32C {ours['verified_checksum']}, "
        f"multipart ETag, {ours['verified_ranges']} sampled ranges)"
    )
    bound = options.concurrency * options.part_size / MiB
    growth = (ours["rss_peak"] - ours["rss_baseline"]) / MiB
    print(
        f"memory: our RSS grew {growth:.1f} MiB during a {options.size / GiB:.2f} GiB upload; "
        f"bound concurrency x part size = {bound:.0f} MiB ({'within' if growth <= 2 * bound else 'ABOVE'} 2x the bound)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
