"""The embedded StateStore: one SQLite file under the data directory (see sqlite_db for the file's rules)."""

from __future__ import annotations

import math
import sqlite3
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from functions.state.clock import Clock, system_clock
from functions.state.errors import (
    AlreadyExistsError,
    CorruptRecordError,
    NotFoundError,
    PreconditionFailedError,
    VersionConflictError,
)
from functions.state.models import (
    TOKEN_HASH_PATTERN,
    ApiToken,
    Image,
    Job,
    LockInfo,
    Schedule,
    Server,
    Status,
    validate_id,
)
from functions.state.sqlite_db import SqliteDatabase

RecordT = TypeVar("RecordT", bound=BaseModel)


def _parse(model: type[RecordT], kind: str, record_id: str, doc: str) -> RecordT:
    try:
        return model.model_validate_json(doc)
    except ValidationError as error:
        raise CorruptRecordError(kind, record_id, str(error)) from error


def _sortable(moment: datetime) -> str:
    """A time as text that sorts like the time (fixed width, always with microseconds)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class SqliteStateStore:
    """StateStore on a SQLite file; safe to share between threads and processes."""

    def __init__(self, path: Path, *, clock: Clock = system_clock) -> None:
        self.database = SqliteDatabase(path)
        self._clock = clock

    @property
    def path(self) -> Path:
        return self.database.path

    def _one(self, sql: str, *args: object) -> tuple[object, ...] | None:
        row: tuple[object, ...] | None = self.database.read().execute(sql, args).fetchone()
        return row

    def _docs(self, sql: str, *args: object) -> list[tuple[str, str]]:
        rows: list[tuple[str, str]] = self.database.read().execute(sql, args).fetchall()
        return rows

    # Servers
    def put_server(self, server: Server) -> None:
        with self.database.write() as db:
            db.execute(
                "INSERT OR REPLACE INTO servers (id, tenant, doc) VALUES (?, ?, ?)",
                (server.id, server.tenant, server.model_dump_json()),
            )

    def create_server(self, server: Server) -> None:
        with self.database.write() as db:
            try:
                db.execute(
                    "INSERT INTO servers (id, tenant, doc) VALUES (?, ?, ?)",
                    (server.id, server.tenant, server.model_dump_json()),
                )
            except sqlite3.IntegrityError as error:
                raise AlreadyExistsError("server", server.id) from error

    def get_server(self, server_id: str) -> Server:
        validate_id("server", server_id)
        row = self._one("SELECT doc FROM servers WHERE id = ?", server_id)
        if row is None:
            raise NotFoundError("server", server_id)
        return _parse(Server, "server", server_id, str(row[0]))

    def list_servers(self, tenant: str) -> list[Server]:
        validate_id("tenant", tenant)
        rows = self._docs("SELECT id, doc FROM servers WHERE tenant = ? ORDER BY id", tenant)
        return [_parse(Server, "server", record_id, doc) for record_id, doc in rows]

    def list_all_servers(self) -> list[Server]:
        rows = self._docs("SELECT id, doc FROM servers ORDER BY id")
        return [_parse(Server, "server", record_id, doc) for record_id, doc in rows]

    def swap_server_disk(self, server_id: str, *, expected_disk: str, new_disk: str) -> Server:
        validate_id("server", server_id)
        with self.database.write() as db:
            row = db.execute("SELECT doc FROM servers WHERE id = ?", (server_id,)).fetchone()
            if row is None:
                raise NotFoundError("server", server_id)
            server = _parse(Server, "server", server_id, row[0])
            if server.disk != expected_disk:
                raise PreconditionFailedError("server", server_id, "disk", expected_disk, server.disk)
            moved = Server.model_validate({**server.model_dump(), "disk": new_disk})
            db.execute("UPDATE servers SET doc = ? WHERE id = ?", (moved.model_dump_json(), server_id))
        return moved

    def replace_server(self, expected: Server, new: Server) -> Server:
        validate_id("server", expected.id)
        if new.id != expected.id:
            raise ValueError(f"server {expected.id!r} cannot be replaced by server {new.id!r}")
        with self.database.write() as db:
            row = db.execute("SELECT doc FROM servers WHERE id = ?", (expected.id,)).fetchone()
            if row is None:
                raise NotFoundError("server", expected.id)
            current = _parse(Server, "server", expected.id, row[0])
            if current != expected:
                raise PreconditionFailedError("server", expected.id, "record", str(expected.chain), str(current.chain))
            db.execute("UPDATE servers SET doc = ? WHERE id = ?", (new.model_dump_json(), expected.id))
        return new

    def delete_server(self, server_id: str) -> bool:
        validate_id("server", server_id)
        with self.database.write() as db:
            return db.execute("DELETE FROM servers WHERE id = ?", (server_id,)).rowcount > 0

    # Jobs
    def create_job(self, job: Job) -> Job:
        stored = job.revised(version=0)
        with self.database.write() as db:
            try:
                db.execute(
                    "INSERT INTO jobs (id, server_id, created_at, version, doc) VALUES (?, ?, ?, 0, ?)",
                    (job.id, job.server_id, _sortable(job.created_at), stored.model_dump_json()),
                )
            except sqlite3.IntegrityError as error:
                raise AlreadyExistsError("job", job.id) from error
        return stored

    def get_job(self, job_id: str) -> Job:
        validate_id("job", job_id)
        row = self._one("SELECT doc FROM jobs WHERE id = ?", job_id)
        if row is None:
            raise NotFoundError("job", job_id)
        return _parse(Job, "job", job_id, str(row[0]))

    def update_job(self, job: Job) -> Job:
        stored = job.revised(version=job.version + 1)
        with self.database.write() as db:
            row = db.execute("SELECT version FROM jobs WHERE id = ?", (job.id,)).fetchone()
            found = None if row is None else int(row[0])
            if found != job.version:
                raise VersionConflictError("job", job.id, job.version, found)
            db.execute(
                "UPDATE jobs SET server_id = ?, version = ?, doc = ? WHERE id = ?",
                (job.server_id, stored.version, stored.model_dump_json(), job.id),
            )
        return stored

    def list_jobs(self, server_id: str) -> list[Job]:
        validate_id("server", server_id)
        rows = self._docs("SELECT id, doc FROM jobs WHERE server_id = ? ORDER BY created_at, id", server_id)
        return [_parse(Job, "job", record_id, doc) for record_id, doc in rows]

    def list_unfinished_jobs(self) -> list[Job]:
        rows = self._docs(
            "SELECT id, doc FROM jobs WHERE json_extract(doc, '$.status') NOT IN (?, ?) ORDER BY created_at, id",
            Status.ACTIVE.value,
            Status.ERROR.value,
        )
        return [_parse(Job, "job", record_id, doc) for record_id, doc in rows]

    # Images
    def put_image(self, image: Image) -> None:
        with self.database.write() as db:
            db.execute(
                "INSERT OR REPLACE INTO images (id, server_id, tenant, created_at, doc) VALUES (?, ?, ?, ?, ?)",
                (image.id, image.server_id, image.tenant, _sortable(image.created_at), image.model_dump_json()),
            )

    def get_image(self, image_id: str) -> Image:
        validate_id("image", image_id)
        row = self._one("SELECT doc FROM images WHERE id = ?", image_id)
        if row is None:
            raise NotFoundError("image", image_id)
        return _parse(Image, "image", image_id, str(row[0]))

    def list_images(self, *, server_id: str | None = None, tenant: str | None = None) -> list[Image]:
        if (server_id is None) == (tenant is None):
            raise TypeError("list_images takes exactly one of server_id and tenant")
        if server_id is not None:
            validate_id("server", server_id)
            sql, key = "SELECT id, doc FROM images WHERE server_id = ? ORDER BY created_at, id", server_id
        else:
            key = validate_id("tenant", tenant)
            sql = "SELECT id, doc FROM images WHERE tenant = ? ORDER BY created_at, id"
        return [_parse(Image, "image", record_id, doc) for record_id, doc in self._docs(sql, key)]

    def update_image_status(self, image_id: str, status: Status) -> Image:
        validate_id("image", image_id)
        with self.database.write() as db:
            row = db.execute("SELECT doc FROM images WHERE id = ?", (image_id,)).fetchone()
            if row is None:
                raise NotFoundError("image", image_id)
            image = _parse(Image, "image", image_id, row[0]).model_copy(update={"status": Status(status)})
            db.execute("UPDATE images SET doc = ? WHERE id = ?", (image.model_dump_json(), image_id))
        return image

    def delete_image(self, image_id: str) -> bool:
        validate_id("image", image_id)
        with self.database.write() as db:
            return db.execute("DELETE FROM images WHERE id = ?", (image_id,)).rowcount > 0

    # Schedules
    def put_schedule(self, schedule: Schedule) -> None:
        with self.database.write() as db:
            db.execute(
                "INSERT OR REPLACE INTO schedules (server_id, tenant, doc) VALUES (?, ?, ?)",
                (schedule.server_id, schedule.tenant, schedule.model_dump_json()),
            )

    def get_schedule(self, server_id: str) -> Schedule:
        validate_id("server", server_id)
        row = self._one("SELECT doc FROM schedules WHERE server_id = ?", server_id)
        if row is None:
            raise NotFoundError("schedule", server_id)
        return _parse(Schedule, "schedule", server_id, str(row[0]))

    def list_schedules(self, tenant: str | None = None) -> list[Schedule]:
        if tenant is None:
            rows = self._docs("SELECT server_id, doc FROM schedules ORDER BY server_id")
        else:
            validate_id("tenant", tenant)
            rows = self._docs("SELECT server_id, doc FROM schedules WHERE tenant = ? ORDER BY server_id", tenant)
        return [_parse(Schedule, "schedule", record_id, doc) for record_id, doc in rows]

    def claim_schedule_window(self, server_id: str, window_start: datetime) -> bool:
        validate_id("server", server_id)
        with self.database.write() as db:
            row = db.execute("SELECT doc FROM schedules WHERE server_id = ?", (server_id,)).fetchone()
            if row is None:
                raise NotFoundError("schedule", server_id)
            schedule = _parse(Schedule, "schedule", server_id, row[0])
            if schedule.last_window_started is not None and schedule.last_window_started >= window_start:
                return False
            claimed = Schedule.model_validate({**schedule.model_dump(), "last_window_started": window_start})
            db.execute("UPDATE schedules SET doc = ? WHERE server_id = ?", (claimed.model_dump_json(), server_id))
        return True

    def delete_schedule(self, server_id: str) -> bool:
        validate_id("server", server_id)
        with self.database.write() as db:
            return db.execute("DELETE FROM schedules WHERE server_id = ?", (server_id,)).rowcount > 0

    # API tokens
    def put_token(self, token: ApiToken) -> None:
        with self.database.write() as db:
            db.execute(
                "INSERT OR REPLACE INTO api_tokens (token_hash, tenant, doc) VALUES (?, ?, ?)",
                (token.token_hash, token.tenant, token.model_dump_json()),
            )

    def find_token(self, token_hash: str) -> ApiToken | None:
        validate_id("token hash", token_hash, TOKEN_HASH_PATTERN)
        row = self._one("SELECT doc FROM api_tokens WHERE token_hash = ?", token_hash)
        return None if row is None else _parse(ApiToken, "api token", token_hash, str(row[0]))

    def list_tokens(self, tenant: str | None = None) -> list[ApiToken]:
        if tenant is None:
            rows = self._docs("SELECT token_hash, doc FROM api_tokens")
        else:
            validate_id("tenant", tenant)
            rows = self._docs("SELECT token_hash, doc FROM api_tokens WHERE tenant = ?", tenant)
        tokens = [_parse(ApiToken, "api token", token_hash, doc) for token_hash, doc in rows]
        return sorted(tokens, key=lambda token: (token.created_at, token.id))

    def delete_token(self, token_id: str) -> bool:
        validate_id("token", token_id)
        with self.database.write() as db:
            # The id is derived from the hash (records older than ids do not store it): match it on the parsed rows.
            for token_hash, doc in db.execute("SELECT token_hash, doc FROM api_tokens").fetchall():
                if _parse(ApiToken, "api token", token_hash, doc).id == token_id:
                    db.execute("DELETE FROM api_tokens WHERE token_hash = ?", (token_hash,))
                    return True
        return False

    def touch_token(self, token_hash: str, at: datetime) -> None:
        validate_id("token hash", token_hash, TOKEN_HASH_PATTERN)
        with self.database.write() as db:
            row = db.execute("SELECT doc FROM api_tokens WHERE token_hash = ?", (token_hash,)).fetchone()
            if row is None:
                return
            token = _parse(ApiToken, "api token", token_hash, row[0])
            if token.last_used_at is not None and token.last_used_at >= at:
                return
            used = ApiToken.model_validate({**token.model_dump(), "last_used_at": at})
            db.execute("UPDATE api_tokens SET doc = ? WHERE token_hash = ?", (used.model_dump_json(), token_hash))

    # Locks
    def acquire_lock(self, server_id: str, owner: str, ttl_seconds: float) -> bool:
        validate_id("server", server_id)
        validate_id("lock owner", owner)
        if not (math.isfinite(ttl_seconds) and ttl_seconds > 0):
            raise ValueError(f"lock ttl must be a positive number of seconds, not {ttl_seconds!r}")
        now = self._clock()
        expires = now + timedelta(seconds=ttl_seconds)
        with self.database.write() as db:
            row = db.execute("SELECT owner, expires_at FROM locks WHERE server_id = ?", (server_id,)).fetchone()
            if row is not None and row[0] != owner and float(row[1]) > now.timestamp():
                return False
            db.execute(
                "INSERT OR REPLACE INTO locks (server_id, owner, acquired_at, expires_at) VALUES (?, ?, ?, ?)",
                (server_id, owner, now.timestamp(), expires.timestamp()),
            )
        return True

    def release_lock(self, server_id: str, owner: str) -> bool:
        validate_id("server", server_id)
        validate_id("lock owner", owner)
        with self.database.write() as db:
            deleted = db.execute("DELETE FROM locks WHERE server_id = ? AND owner = ?", (server_id, owner))
            return deleted.rowcount > 0

    def get_lock(self, server_id: str) -> LockInfo | None:
        validate_id("server", server_id)
        row = self._one("SELECT owner, acquired_at, expires_at FROM locks WHERE server_id = ?", server_id)
        if row is None:
            return None
        owner, acquired_at, expires_at = str(row[0]), float(str(row[1])), float(str(row[2]))
        if expires_at <= self._clock().timestamp():
            return None
        return LockInfo(
            server_id=server_id,
            owner=owner,
            acquired_at=datetime.fromtimestamp(acquired_at, UTC),
            expires_at=datetime.fromtimestamp(expires_at, UTC),
        )

    def close(self) -> None:
        self.database.close()
