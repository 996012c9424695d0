"""A child process that races for a server's lock in a shared SQLite file (kept apart from moto: spawns start fast)."""

from __future__ import annotations

from multiprocessing.queues import Queue
from multiprocessing.synchronize import Barrier
from pathlib import Path

from functions.state.sqlite_state import SqliteStateStore


def race_for_the_lock(path: str, owner: str, barrier: Barrier, results: Queue[tuple[str, bool]]) -> None:
    store = SqliteStateStore(Path(path))
    barrier.wait(timeout=60)
    results.put((owner, store.acquire_lock("srv-1", owner, 60)))
    store.close()
