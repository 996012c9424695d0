"""The file store leaves nothing behind (issue 14 item 7): no lock file outlives its use, a delete removes the
folders it empties up to the root, a writer racing such a delete still lands its object, the per-key lock stays
exclusive although its file is removed by each holder, and a killed writer's temp files are swept."""

from __future__ import annotations

import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from functions.storage import FileObjectStore


def empty_folders(root: Path) -> list[Path]:
    area = root / ".imaging-store"
    return [
        path
        for path in root.rglob("*")
        if path.is_dir() and not any(path.iterdir()) and area not in (path, *path.parents)
    ]


def test_deletes_remove_the_folders_they_empty_and_no_lock_file_stays(tmp_path: Path) -> None:
    store = FileObjectStore(tmp_path / "store")
    keys = [f"images/img-{n}/image.vhd.zst" for n in range(3)] + ["staging/job-1/frames/000001.zst", "keep/me"]
    for key in keys:
        store.put(key, key.encode())
    store.delete(keys[0])
    store.delete_many(keys[1:4])

    assert [info.key for info in store.list_objects()] == ["keep/me"]
    assert not (store.root / "images").exists() and not (store.root / "staging").exists()
    assert empty_folders(store.root) == []
    assert list((store.root / ".imaging-store" / "locks").iterdir()) == []
    assert store.root.is_dir(), "the root itself stays"


def test_writers_racing_deletes_of_the_same_folder_always_land(tmp_path: Path) -> None:
    store = FileObjectStore(tmp_path / "store")

    def churn(worker: int) -> list[str]:
        kept = []
        for round_ in range(60):
            key = f"staging/job-x/frames/{worker:02d}-{round_:03d}.zst"
            store.put(key, b"frame")
            if round_ % 2:
                store.delete(key)  # empties the folder now and then while the others write into it
            else:
                kept.append(key)
        return kept

    with ThreadPoolExecutor(max_workers=6) as pool:
        kept = sorted(key for keys in pool.map(churn, range(6)) for key in keys)

    assert [info.key for info in store.list_objects("staging/")] == kept
    store.delete_many(kept)
    assert not (store.root / "staging").exists()
    assert list((store.root / ".imaging-store" / "locks").iterdir()) == []


def test_the_key_lock_stays_exclusive_while_its_file_comes_and_goes(tmp_path: Path) -> None:
    store = FileObjectStore(tmp_path / "store")
    inside, most = 0, 0
    guard = threading.Lock()

    def hold(_: int) -> None:
        nonlocal inside, most
        with store._key_lock("one/key"):
            with guard:
                inside += 1
                most = max(most, inside)
            time.sleep(0.001)  # holds the lock a little, so that waiters pile up on the file being removed
            with guard:
                inside -= 1

    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(hold, range(400)))

    assert most == 1
    assert list((store.root / ".imaging-store" / "locks").iterdir()) == []


def test_a_killed_writers_temp_files_and_unheld_locks_are_swept_once_stale(tmp_path: Path) -> None:
    store = FileObjectStore(tmp_path / "store")
    area = store.root / ".imaging-store"
    old_part, fresh_part, old_lock = area / "tmp" / "dead.part", area / "tmp" / "live.part", area / "locks" / "ab"
    for path in (old_part, fresh_part, old_lock):
        path.write_bytes(b"x")
    an_hour_ago = time.time() - 3600
    os.utime(old_part, (an_hour_ago, an_hour_ago))

    assert store.sweep_leftovers(older_than_s=300) == 2

    assert not old_part.exists() and not old_lock.exists()
    assert fresh_part.exists(), "a file written lately may be a live writer's"
