"""Part planning, backoff and the bandwidth limit: pure logic, no store."""

from __future__ import annotations

import random

import pytest

from functions.storage.bandwidth import FLAVOR_CLASS_BANDWIDTH, TokenBucket, bucket_for_flavor_class
from functions.storage.errors import PartPlanError, TransientStorageError
from functions.storage.objects import MAX_PART_SIZE, MAX_PARTS, MIN_PART_SIZE
from functions.storage.parts import PartPlan, check_plan, plan_fixed_parts, plan_frame_parts
from functions.storage.retry import RetryPolicy, call_with_retries

MiB = 1024**2


def assert_valid(parts: list[PartPlan], total: int) -> None:
    check_plan(parts, total)  # contiguous, numbered, within limits
    assert len(parts) <= MAX_PARTS
    assert all(part.length <= MAX_PART_SIZE for part in parts)
    assert all(part.length >= MIN_PART_SIZE for part in parts[:-1])


def test_fixed_parts_cover_the_file() -> None:
    parts = plan_fixed_parts(100 * MiB + 1, 16 * MiB)
    assert [part.length for part in parts] == [16 * MiB] * 6 + [4 * MiB + 1]
    assert_valid(parts, 100 * MiB + 1)
    assert plan_fixed_parts(0) == [PartPlan(1, 0, 0)]


def test_fixed_parts_grow_to_stay_within_ten_thousand() -> None:
    total = 5 * 1024**4  # S3's largest object
    parts = plan_fixed_parts(total, 5 * MiB)
    assert len(parts) <= MAX_PARTS
    assert_valid(parts, total)
    with pytest.raises(PartPlanError):
        plan_fixed_parts(10, 1 * MiB)


def test_frame_parts_follow_frame_boundaries() -> None:
    rng = random.Random(7)
    # a sparse image: most frames are tiny, some are near a whole 64 MiB chunk
    frames = [rng.choice([40, 3000, 2 * MiB, 30 * MiB, 64 * MiB]) for _ in range(500)]
    parts = plan_frame_parts(frames, 16 * MiB)
    total = sum(frames)
    assert_valid(parts, total)
    boundaries = {0}
    offset = 0
    for size in frames:
        offset += size
        boundaries.add(offset)
    assert all(part.offset in boundaries and part.end in boundaries for part in parts)
    # greedy grouping: every part but the last reaches the target, and no frame could have been left out earlier
    assert all(part.length >= 16 * MiB for part in parts[:-1])


def test_frame_parts_small_images_and_limits() -> None:
    assert plan_frame_parts([100, 200]) == [PartPlan(1, 0, 300)]
    assert plan_frame_parts([]) == [PartPlan(1, 0, 0)]
    with pytest.raises(PartPlanError):
        plan_frame_parts([MAX_PART_SIZE + 1])
    many = [MIN_PART_SIZE] * 20_000
    parts = plan_frame_parts(many, MIN_PART_SIZE)
    assert len(parts) <= MAX_PARTS
    assert_valid(parts, sum(many))


def test_check_plan_names_the_problem() -> None:
    with pytest.raises(PartPlanError, match="starts at"):
        check_plan([PartPlan(1, 0, 6 * MiB), PartPlan(2, 6 * MiB + 1, 10)], 6 * MiB + 11)
    with pytest.raises(PartPlanError, match="less than"):
        check_plan([PartPlan(1, 0, 10), PartPlan(2, 10, 10)], 20)
    with pytest.raises(PartPlanError, match="cover"):
        check_plan([PartPlan(1, 0, 10)], 11)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_token_bucket_holds_the_long_run_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=10 * MiB, burst=10 * MiB, clock=clock, sleep=clock.sleep)
    for _ in range(20):
        bucket.acquire(5 * MiB)
    # 100 MiB at 10 MiB/s with a 10 MiB head start: 9 seconds
    assert clock.now == pytest.approx(9.0)
    clock.now += 100  # idle: the bucket refills only up to its burst
    assert bucket.acquire(10 * MiB) == 0.0
    assert bucket.acquire(10 * MiB) == pytest.approx(1.0)


def test_flavor_classes() -> None:
    assert bucket_for_flavor_class("performance") is None
    legacy = bucket_for_flavor_class("legacy")
    assert legacy is not None and legacy.rate == FLAVOR_CLASS_BANDWIDTH["legacy"]
    with pytest.raises(ValueError, match="legacy"):
        bucket_for_flavor_class("unknown")


def test_retries_back_off_with_full_jitter() -> None:
    policy = RetryPolicy(attempts=6, base_delay=0.5, max_delay=3.0)
    clock = FakeClock()
    calls = 0

    def flaky() -> str:
        nonlocal calls
        calls += 1
        if calls < 6:
            raise TransientStorageError("busy")
        return "ok"

    assert call_with_retries(flaky, policy, sleep=clock.sleep, rng=random.Random(1)) == "ok"
    assert len(clock.sleeps) == 5
    caps = [min(3.0, 0.5 * 2**retry) for retry in range(5)]
    assert all(0 <= delay <= cap for delay, cap in zip(clock.sleeps, caps, strict=True))
    assert len(set(clock.sleeps)) == 5  # jittered, not a fixed schedule

    calls = -100
    with pytest.raises(TransientStorageError):
        call_with_retries(flaky, policy, sleep=clock.sleep, rng=random.Random(1))
    assert calls == -100 + policy.attempts


def test_non_transient_errors_are_not_retried() -> None:
    calls = 0

    def broken() -> None:
        nonlocal calls
        calls += 1
        raise PartPlanError("bad")

    with pytest.raises(PartPlanError):
        call_with_retries(broken, RetryPolicy(), sleep=lambda _: None)
    assert calls == 1
