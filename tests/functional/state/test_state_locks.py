"""The per-server imaging lock on every backend: one winner among racers, owner-only release, expiry by TTL."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from functions.state import InvalidIdError, StateStore
from tests.functional.state.clocks import ManualClock

TTL = 30.0


def test_fifty_racing_threads_get_exactly_one_lock(
    store: StateStore, run_threads: Callable[[int, Callable[[int], object]], list[object]]
) -> None:
    results = run_threads(50, lambda index: store.acquire_lock("srv-1", f"job-{index}", TTL))

    assert all(isinstance(result, bool) for result in results), results
    winners = [index for index, won in enumerate(results) if won is True]
    assert len(winners) == 1
    lock = store.get_lock("srv-1")
    assert lock is not None
    assert lock.owner == f"job-{winners[0]}"


def test_locks_of_different_servers_are_independent(store: StateStore) -> None:
    assert store.acquire_lock("srv-1", "job-a", TTL)
    assert store.acquire_lock("srv-2", "job-b", TTL)
    assert not store.acquire_lock("srv-1", "job-b", TTL)


def test_only_the_owner_releases(store: StateStore) -> None:
    assert store.acquire_lock("srv-1", "job-a", TTL)

    assert store.release_lock("srv-1", "job-b") is False
    lock = store.get_lock("srv-1")
    assert lock is not None and lock.owner == "job-a"
    assert not store.acquire_lock("srv-1", "job-b", TTL)

    assert store.release_lock("srv-1", "job-a") is True
    assert store.get_lock("srv-1") is None
    assert store.release_lock("srv-1", "job-a") is False
    assert store.acquire_lock("srv-1", "job-b", TTL)


def test_a_crashed_holders_lock_expires_after_its_ttl(store: StateStore, clock: ManualClock) -> None:
    acquired_at = clock()
    assert store.acquire_lock("srv-1", "job-crashed", TTL)
    lock = store.get_lock("srv-1")
    assert lock is not None
    assert lock.acquired_at == acquired_at
    assert (lock.expires_at - lock.acquired_at).total_seconds() == pytest.approx(TTL)

    clock.advance(TTL - 0.5)
    assert not store.acquire_lock("srv-1", "job-next", TTL)
    assert store.get_lock("srv-1") is not None

    clock.advance(1.0)
    assert store.get_lock("srv-1") is None
    assert store.acquire_lock("srv-1", "job-next", TTL)
    # The crashed holder, coming back, no longer owns anything.
    assert store.release_lock("srv-1", "job-crashed") is False
    lock = store.get_lock("srv-1")
    assert lock is not None and lock.owner == "job-next"


def test_the_owner_renews_its_lock(store: StateStore, clock: ManualClock) -> None:
    assert store.acquire_lock("srv-1", "job-a", TTL)
    clock.advance(TTL - 1)
    assert store.acquire_lock("srv-1", "job-a", TTL)
    clock.advance(TTL - 1)
    lock = store.get_lock("srv-1")
    assert lock is not None and lock.owner == "job-a"
    assert not store.acquire_lock("srv-1", "job-b", TTL)


@pytest.mark.parametrize("ttl", [0.0, -5.0, float("nan"), float("inf")])
def test_a_lock_needs_a_positive_finite_ttl(store: StateStore, ttl: float) -> None:
    with pytest.raises(ValueError, match="ttl"):
        store.acquire_lock("srv-1", "job-a", ttl)


@pytest.mark.parametrize("server_id", ["../srv", "srv/1", "", "srv 1", "-srv"])
def test_lock_ids_are_validated(store: StateStore, server_id: str) -> None:
    with pytest.raises(InvalidIdError):
        store.acquire_lock(server_id, "job-a", TTL)
    with pytest.raises(InvalidIdError):
        store.acquire_lock("srv-1", server_id or "../", TTL)
