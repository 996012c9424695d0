"""The StateStore protocol: one interface for job and image state, implemented on SQLite and on DynamoDB.

Reads that miss raise NotFoundError; creates that collide raise AlreadyExistsError; deletes answer whether something
was deleted (so retries and retention races are harmless). Every id argument is validated (InvalidIdError) before it
reaches a key. Time comes from the store's injected clock.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Protocol, runtime_checkable

from functions.state.errors import VersionConflictError
from functions.state.models import ApiToken, Image, Job, LockInfo, Schedule, Server, Status


@runtime_checkable
class StateStore(Protocol):
    # Servers
    def put_server(self, server: Server) -> None:
        """Create or replace a server record."""

    def create_server(self, server: Server) -> None:
        """Store a new server record; AlreadyExistsError if the id is taken (put_server replaces)."""
        ...

    def get_server(self, server_id: str) -> Server: ...

    def list_servers(self, tenant: str) -> list[Server]:
        """The tenant's servers, by id."""
        ...

    def list_all_servers(self) -> list[Server]:
        """Every tenant's servers, by id (the CLI's write guard protects all registered chains)."""
        ...

    def swap_server_disk(self, server_id: str, *, expected_disk: str, new_disk: str) -> Server:
        """Move the server's active-disk pointer atomically (snapshot); PreconditionFailedError if it moved."""
        ...

    def replace_server(self, expected: Server, new: Server) -> Server:
        """Store `new` in place of the server record, only if it is still `expected` (chain record swaps);
        PreconditionFailedError otherwise."""
        ...

    def delete_server(self, server_id: str) -> bool: ...

    # Jobs
    def create_job(self, job: Job) -> Job:
        """Store a new job at version 0; AlreadyExistsError if the id is taken."""
        ...

    def get_job(self, job_id: str) -> Job: ...

    def update_job(self, job: Job) -> Job:
        """Store `job` if the stored version is still `job.version`; returns it at version + 1.

        VersionConflictError when another writer got there first (re-read, re-apply, retry).
        """
        ...

    def list_jobs(self, server_id: str) -> list[Job]:
        """The server's jobs, oldest first."""
        ...

    def list_unfinished_jobs(self) -> list[Job]:
        """Every job not yet ACTIVE or ERROR, of any server or disk, oldest first (recovery looks for dead ones)."""
        ...

    # Images
    def put_image(self, image: Image) -> None:
        """Create or replace an image record."""

    def get_image(self, image_id: str) -> Image: ...

    def list_images(self, *, server_id: str | None = None, tenant: str | None = None) -> list[Image]:
        """Images of one server or of one tenant (exactly one of the two), oldest first."""
        ...

    def update_image_status(self, image_id: str, status: Status) -> Image: ...

    def delete_image(self, image_id: str) -> bool: ...

    # Schedules (one per server)
    def put_schedule(self, schedule: Schedule) -> None: ...

    def get_schedule(self, server_id: str) -> Schedule: ...

    def list_schedules(self, tenant: str | None = None) -> list[Schedule]:
        """All schedules (for the due-schedule run) or one tenant's, by server id."""
        ...

    def claim_schedule_window(self, server_id: str, window_start: datetime) -> bool:
        """Record that the window starting at `window_start` was started, if no window that late was yet.

        True for exactly one caller per window, however often the trigger is delivered.
        """
        ...

    def delete_schedule(self, server_id: str) -> bool: ...

    # API tokens
    def put_token(self, token: ApiToken) -> None: ...

    def find_token(self, token_hash: str) -> ApiToken | None: ...

    def list_tokens(self, tenant: str | None = None) -> list[ApiToken]:
        """The tenant's tokens, or every tenant's (None), oldest first."""
        ...

    def delete_token(self, token_id: str) -> bool:
        """Revoke the token whose id (not hash) is `token_id`: its bearer is unknown from then on."""
        ...

    def touch_token(self, token_hash: str, at: datetime) -> None:
        """Record that the token was used at `at` (a later use than the one recorded; nothing if it is gone)."""

    # Per-server imaging lock
    def acquire_lock(self, server_id: str, owner: str, ttl_seconds: float) -> bool:
        """Take the server's lock for `ttl_seconds` if it is free, expired, or already `owner`'s (then renewed)."""
        ...

    def release_lock(self, server_id: str, owner: str) -> bool:
        """Release the lock if `owner` holds it; False (and nothing changed) otherwise."""
        ...

    def get_lock(self, server_id: str) -> LockInfo | None:
        """The live lock of the server, or None if it is free or its holder's lease has expired."""
        ...

    def close(self) -> None: ...


def modify_job(store: StateStore, job_id: str, change: Callable[[Job], Job], *, max_attempts: int = 100) -> Job:
    """Read the job, apply `change`, store it; on a version conflict re-read and re-apply (optimistic concurrency).

    For writers that race on one job (Map workers adding their bytes done). `change` must be a pure function of
    the job it is given. Raises the last VersionConflictError after `max_attempts` lost races.
    """
    for attempt in range(1, max_attempts + 1):
        current = store.get_job(job_id)
        try:
            return store.update_job(change(current))
        except VersionConflictError:
            if attempt == max_attempts:
                raise
    raise AssertionError("unreachable: the loop returns or raises")
