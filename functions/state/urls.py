"""State URLs (DESIGN §6): `sqlite:///PATH` (embedded default) and `dynamodb://TABLE` (AWS)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from functions.state.errors import InvalidStateUrlError

SQLITE_PREFIX: Final = "sqlite:///"
DYNAMODB_PREFIX: Final = "dynamodb://"
# DynamoDB's own rule for table names.
TABLE_NAME_PATTERN: Final = re.compile(r"[A-Za-z0-9_.-]{3,255}")


@dataclass(frozen=True)
class SqliteLocation:
    path: Path


@dataclass(frozen=True)
class DynamoDBLocation:
    table: str


def parse_state_url(url: str) -> SqliteLocation | DynamoDBLocation:
    """Where a state URL points. SQLite paths follow SQLAlchemy: `sqlite:////abs/file`, `sqlite:///relative/file`."""
    if url.startswith(SQLITE_PREFIX):
        path = url.removeprefix(SQLITE_PREFIX)
        if not path or path.endswith("/") or "\x00" in path:
            raise InvalidStateUrlError(url, "expected sqlite:///PATH to a file")
        return SqliteLocation(Path(path))
    if url.startswith(DYNAMODB_PREFIX):
        table = url.removeprefix(DYNAMODB_PREFIX)
        if TABLE_NAME_PATTERN.fullmatch(table) is None:
            raise InvalidStateUrlError(
                url, f"expected dynamodb://TABLE with TABLE matching {TABLE_NAME_PATTERN.pattern}"
            )
        return DynamoDBLocation(table)
    raise InvalidStateUrlError(url, "expected sqlite:///PATH or dynamodb://TABLE")
