"""Retries with capped exponential backoff and full jitter (AWS architecture blog, "Exponential Backoff And
Jitter"): attempt n waits uniform(0, min(cap, base * 2^n)). Sleep and randomness are injected for tests."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from functions.storage.errors import ChecksumMismatchError, TransientStorageError

_T = TypeVar("_T")

RETRYABLE: tuple[type[Exception], ...] = (TransientStorageError, ChecksumMismatchError)
"""Errors worth repeating the same request for (a checksum mismatch means the bytes were damaged in transit)."""


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 8
    base_delay: float = 0.1
    max_delay: float = 20.0

    def delay(self, retry: int, rng: random.Random) -> float:
        """The wait before retry number `retry` (0-based)."""
        return rng.uniform(0.0, min(self.max_delay, self.base_delay * 2.0**retry))


def call_with_retries(
    operation: Callable[[], _T],
    policy: RetryPolicy,
    *,
    sleep: Callable[[float], None] = time.sleep,
    rng: random.Random | None = None,
    on_retry: Callable[[int, Exception], None] | None = None,
) -> _T:
    """Run `operation`, retrying retryable errors up to `policy.attempts` attempts in all; the last error propagates."""
    chooser = rng if rng is not None else random.Random()
    for retry in range(policy.attempts):
        try:
            return operation()
        except RETRYABLE as error:
            if retry + 1 >= policy.attempts:
                raise
            if on_retry is not None:
                on_retry(retry, error)
            sleep(policy.delay(retry, chooser))
    raise AssertionError("unreachable: the loop returns or raises")
