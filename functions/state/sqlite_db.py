"""The SQLite state file: one connection per thread, WAL, a busy timeout, versioned schema, write transactions.

Shared by the state store and the idempotency persistence layer so both live in the same file. Read-modify-write
goes through `write()`, a `BEGIN IMMEDIATE` transaction: it takes the database's write lock before reading, so two
writers never both see the old row (that is what makes the lock and the conditional writes atomic).
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Final

from functions.state.errors import SchemaVersionError

SCHEMA_VERSION: Final = 1
BUSY_TIMEOUT_SECONDS: Final = 30.0

# Schema version 1. Documents are the models' JSON; the other columns are what we look up or compare by.
_SCHEMA_V1: Final = """
CREATE TABLE servers (id TEXT PRIMARY KEY, tenant TEXT NOT NULL, doc TEXT NOT NULL);
CREATE INDEX servers_by_tenant ON servers (tenant, id);
CREATE TABLE jobs (
    id TEXT PRIMARY KEY, server_id TEXT, created_at TEXT NOT NULL, version INTEGER NOT NULL, doc TEXT NOT NULL
);
CREATE INDEX jobs_by_server ON jobs (server_id, created_at, id);
CREATE TABLE images (
    id TEXT PRIMARY KEY, server_id TEXT, tenant TEXT NOT NULL, created_at TEXT NOT NULL, doc TEXT NOT NULL
);
CREATE INDEX images_by_server ON images (server_id, created_at, id);
CREATE INDEX images_by_tenant ON images (tenant, created_at, id);
CREATE TABLE schedules (server_id TEXT PRIMARY KEY, tenant TEXT NOT NULL, doc TEXT NOT NULL);
CREATE INDEX schedules_by_tenant ON schedules (tenant, server_id);
CREATE TABLE api_tokens (token_hash TEXT PRIMARY KEY, tenant TEXT NOT NULL, doc TEXT NOT NULL);
CREATE TABLE locks (
    server_id TEXT PRIMARY KEY, owner TEXT NOT NULL, acquired_at REAL NOT NULL, expires_at REAL NOT NULL
);
CREATE TABLE idempotency (
    key TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    expiration INTEGER NOT NULL,
    in_progress_expiration INTEGER,
    data TEXT,
    validation TEXT
);
"""
_MIGRATIONS: Final = {1: _SCHEMA_V1}


class SqliteDatabase:
    """The state file at `path`, created and migrated on first use."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()
        self._all: list[sqlite3.Connection] = []
        self._all_guard = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._migrate()

    def _connection(self) -> sqlite3.Connection:
        connection: sqlite3.Connection | None = getattr(self._local, "connection", None)
        if connection is None:
            # Autocommit mode: transactions are explicit (BEGIN IMMEDIATE), never opened behind our back.
            connection = sqlite3.connect(
                self.path, timeout=BUSY_TIMEOUT_SECONDS, isolation_level=None, check_same_thread=False
            )
            connection.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT_SECONDS * 1000)}")
            connection.execute("PRAGMA journal_mode = WAL")
            connection.execute("PRAGMA synchronous = NORMAL")
            self._local.connection = connection
            with self._all_guard:
                self._all.append(connection)
        return connection

    @contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A read-modify-write transaction holding the write lock from its first read; rolled back on error."""
        connection = self._connection()
        connection.execute("BEGIN IMMEDIATE")
        try:
            yield connection
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    def read(self) -> sqlite3.Connection:
        """The thread's connection, for single-statement reads (each sees one consistent snapshot)."""
        return self._connection()

    def _migrate(self) -> None:
        with self.write() as connection:
            found: int = connection.execute("PRAGMA user_version").fetchone()[0]
            if found > SCHEMA_VERSION:
                raise SchemaVersionError(str(self.path), found, SCHEMA_VERSION)
            for version in range(found + 1, SCHEMA_VERSION + 1):
                # executescript would commit our transaction; run the statements one by one inside it.
                for statement in _MIGRATIONS[version].split(";"):
                    if statement.strip():
                        connection.execute(statement)
                connection.execute(f"PRAGMA user_version = {version}")

    def close(self) -> None:
        with self._all_guard:
            connections, self._all = self._all, []
        for connection in connections:
            connection.close()
        self._local = threading.local()
