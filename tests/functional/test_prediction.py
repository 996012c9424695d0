"""The job's predicted time: its parts from a real estimate and a real file store's measured write rate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

import vhdcore
from functions.imaging.prediction import CLI_FIXED_S, HEAD_START_SHARE, compress_ratio, learn_compress_time, predict_job
from functions.storage import FileObjectStore
from tests.support.workflow import build_sample_chain

REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Measured:
    compressed_bytes: int
    predicted_seconds: float
    seconds_spent: float


def test_an_image_written_in_place_goes_at_the_pace_of_the_slower_of_compressing_and_writing() -> None:
    estimate = Measured(compressed_bytes=400_000_000, predicted_seconds=1.0, seconds_spent=0.05)

    device_bound = predict_job(estimate, in_place=True, write_rate=200_000_000, upload_rate=125_000_000)
    cpu_bound = predict_job(estimate, in_place=True, write_rate=4_000_000_000, upload_rate=125_000_000)

    assert device_bound.seconds == CLI_FIXED_S + 0.05 + 2.0  # the upload rate is a network's: nothing is sent
    assert cpu_bound.seconds == CLI_FIXED_S + 0.05 + 1.0
    assert cpu_bound.after_estimate == 1.0


def test_staged_frames_are_written_twice_and_uploaded_at_the_flavors_bandwidth() -> None:
    estimate = Measured(compressed_bytes=250_000_000, predicted_seconds=1.0, seconds_spent=0.1)

    timing = predict_job(estimate, in_place=False, write_rate=500_000_000, upload_rate=125_000_000, fixed_s=0.3)

    assert (timing.write_s, timing.upload_s) == (1.0, 2.0)
    assert timing.seconds == 0.3 + 0.1 + 1.0 + 2.0


def test_a_real_estimate_and_write_rate_give_a_prediction(tmp_path: Path) -> None:
    store = FileObjectStore(tmp_path / "store")
    rate = store.write_rate()
    assert rate > 0
    assert store.write_rate() == rate  # measured once, then remembered in the store's area
    estimate = vhdcore.open_chain(str(build_sample_chain(tmp_path / "disks"))).estimate(chunk_size=8 * 1024**2)

    timing = predict_job(estimate, in_place=True, write_rate=rate, upload_rate=None)

    assert timing.compress_s == estimate.predicted_seconds
    assert timing.write_s == estimate.compressed_bytes / rate
    assert timing.seconds > CLI_FIXED_S


def test_vhd_estimate_predicts_the_image_job_into_the_configured_store(tmp_path: Path) -> None:
    leaf = build_sample_chain(tmp_path / "disks")
    env = {**os.environ, "IMAGING_DATA_DIR": str(tmp_path / "data"), "PYTHONPATH": str(REPO)}
    env.pop("IMAGING_STORE", None)
    argv = [sys.executable, "-m", "statemachine.cli", "vhd", "estimate", str(leaf), "--json"]

    answer = json.loads(subprocess.run(argv, capture_output=True, text=True, check=True, env=env).stdout)

    job = answer["job"]
    assert job["store"] == (tmp_path / "data" / "store").as_uri()
    assert job["compress_s"] == round(answer["predicted_seconds"], 3)
    data_s = max(job["compress_s"], job["write_s"])
    ahead_s = min(data_s, job["fixed_s"] * HEAD_START_SHARE)  # compressed while the engine starts
    assert job["seconds"] == pytest.approx(job["fixed_s"] + data_s - ahead_s, abs=0.002)
    assert job["estimate_s"] == 0  # image create estimates while the engine loads
    assert (tmp_path / "data" / "store" / ".imaging-store" / "measured.json").is_file()


def test_a_file_store_learns_how_far_the_estimates_compress_time_was_from_the_jobs(tmp_path: Path) -> None:
    store = FileObjectStore(tmp_path / "store")
    assert compress_ratio(store) == 1.0

    learn_compress_time(store, predicted_s=2.0, measured_s=3.0)
    assert compress_ratio(FileObjectStore(tmp_path / "store")) == 1.5  # remembered in the store's area
    learn_compress_time(store, predicted_s=2.0, measured_s=2.0)
    assert compress_ratio(store) == 1.25  # older jobs weigh half as much at each new one
    learn_compress_time(store, predicted_s=0.1, measured_s=5.0)  # mostly fixed costs: nothing learned
    learn_compress_time(store, predicted_s=1.0, measured_s=100.0)  # bounded
    assert compress_ratio(store) == (1.25 + 3.0) / 2

    estimate = Measured(compressed_bytes=100, predicted_seconds=2.0, seconds_spent=0.0)
    timing = predict_job(estimate, in_place=True, write_rate=None, upload_rate=None, compress_ratio=1.25)
    assert timing.compress_s == 2.5


def test_a_head_start_saves_part_of_the_fixed_cost_where_the_image_is_written_in_place() -> None:
    big = Measured(compressed_bytes=100, predicted_seconds=5.0, seconds_spent=0.0)
    small = Measured(compressed_bytes=100, predicted_seconds=0.1, seconds_spent=0.0)

    ahead = predict_job(big, in_place=True, write_rate=None, upload_rate=None, head_start=True)
    staged = predict_job(big, in_place=False, write_rate=None, upload_rate=None, head_start=True)
    tiny = predict_job(small, in_place=True, write_rate=None, upload_rate=None, head_start=True)

    assert ahead.seconds == CLI_FIXED_S + 5.0 - CLI_FIXED_S * HEAD_START_SHARE
    assert staged.seconds == CLI_FIXED_S + 5.0  # frames uploaded: the CLI starts none
    assert tiny.seconds == CLI_FIXED_S  # no more is saved than there is to compress
