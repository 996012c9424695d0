"""The one exception hierarchy of the state layer: every failure a caller may act on has its own type and data."""

from __future__ import annotations


class StateError(Exception):
    """Root of the state layer's errors."""


class InvalidIdError(StateError, ValueError):
    """An id (server, job, image, tenant, owner, token hash) that does not match its strict pattern."""

    def __init__(self, kind: str, value: object, pattern: str) -> None:
        self.kind = kind
        self.value = value
        self.pattern = pattern
        super().__init__(f"invalid {kind} id {value!r}: expected {pattern}")


class NotFoundError(StateError, LookupError):
    """No record of that kind with that id."""

    def __init__(self, kind: str, record_id: str) -> None:
        self.kind = kind
        self.record_id = record_id
        super().__init__(f"{kind} {record_id!r} not found")


class AlreadyExistsError(StateError):
    """A create found a record with the same id."""

    def __init__(self, kind: str, record_id: str) -> None:
        self.kind = kind
        self.record_id = record_id
        super().__init__(f"{kind} {record_id!r} already exists")


class VersionConflictError(StateError):
    """An optimistic-concurrency write lost: the stored record changed since the caller read it."""

    def __init__(self, kind: str, record_id: str, expected_version: int, found_version: int | None) -> None:
        self.kind = kind
        self.record_id = record_id
        self.expected_version = expected_version
        self.found_version = found_version
        found = "no record" if found_version is None else f"version {found_version}"
        super().__init__(
            f"{kind} {record_id!r} changed concurrently: expected version {expected_version}, found {found}"
        )


class PreconditionFailedError(StateError):
    """A compare-and-set write whose expected current value did not match (e.g. a server's active disk moved)."""

    def __init__(self, kind: str, record_id: str, field: str, expected: object, found: object) -> None:
        self.kind = kind
        self.record_id = record_id
        self.field = field
        self.expected = expected
        self.found = found
        super().__init__(f"{kind} {record_id!r}: expected {field} {expected!r}, found {found!r}")


class InvalidStateUrlError(StateError, ValueError):
    """A state URL that names no backend we know (`sqlite:///PATH` or `dynamodb://TABLE`)."""

    def __init__(self, url: str, reason: str) -> None:
        self.url = url
        self.reason = reason
        super().__init__(f"invalid state URL {url!r}: {reason}")


class SchemaVersionError(StateError):
    """The SQLite file was written by a newer version of this program (its schema is unknown to us)."""

    def __init__(self, path: str, found: int, supported: int) -> None:
        self.path = path
        self.found = found
        self.supported = supported
        super().__init__(f"state database {path} has schema version {found}; this program supports up to {supported}")


class RecordTooLargeError(StateError):
    """A record whose serialized form exceeds what the backend stores in one item."""

    def __init__(self, kind: str, record_id: str, size: int, limit: int) -> None:
        self.kind = kind
        self.record_id = record_id
        self.size = size
        self.limit = limit
        super().__init__(f"{kind} {record_id!r} is {size} bytes serialized; the limit is {limit}")


class CorruptRecordError(StateError):
    """A stored record that no longer parses as its model (hand-edited or written by a broken version)."""

    def __init__(self, kind: str, record_id: str, detail: str) -> None:
        self.kind = kind
        self.record_id = record_id
        self.detail = detail
        super().__init__(f"stored {kind} {record_id!r} is not valid: {detail}")
