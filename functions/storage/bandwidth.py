"""An upload bandwidth limit (token bucket) and the rates that model each server flavor class's hardware."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

FLAVOR_CLASS_BANDWIDTH: dict[str, int | None] = {
    "legacy": 12_500_000,  # 100 Mbit/s: the storage NIC share of old hosts
    "standard": 125_000_000,  # 1 Gbit/s
    "performance": None,  # 10 Gbit/s and more: the store, not the host, is the limit
}
"""Sustained bytes per second one imaging job may send from a host of each flavor class (None: unlimited)."""
DEFAULT_FLAVOR_CLASS = "standard"
"""The class of a flavor that names none, and of a disk imaged without a server."""


class TokenBucket:
    """Thread-safe token bucket: `rate` bytes per second on average, bursts up to `burst` bytes.

    `acquire(n)` reserves n bytes at once (the level may go negative) and sleeps until the reservation is paid,
    so concurrent senders queue fairly and the long-run rate never exceeds `rate`.
    """

    def __init__(
        self,
        rate: float,
        burst: float | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate <= 0:
            raise ValueError(f"a bandwidth limit must be positive, got {rate}")
        self.rate = rate
        self.burst = burst if burst is not None else rate
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._level = self.burst
        self._updated = clock()

    def acquire(self, amount: int) -> float:
        """Take `amount` bytes of allowance, sleeping as long as needed; returns the seconds waited."""
        with self._lock:
            now = self._clock()
            self._level = min(self.burst, self._level + (now - self._updated) * self.rate)
            self._updated = now
            self._level -= amount
            wait = -self._level / self.rate if self._level < 0 else 0.0
        if wait > 0:
            self._sleep(wait)
        return wait


def bucket_for_flavor_class(
    flavor_class: str,
    *,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> TokenBucket | None:
    """The limit for a flavor class (None when unlimited); an unknown class is a ValueError naming the known ones."""
    try:
        rate = FLAVOR_CLASS_BANDWIDTH[flavor_class]
    except KeyError:
        known = ", ".join(sorted(FLAVOR_CLASS_BANDWIDTH))
        raise ValueError(f"unknown flavor class {flavor_class!r}; known: {known}") from None
    return None if rate is None else TokenBucket(rate, clock=clock, sleep=sleep)
