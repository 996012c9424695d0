"""Typed stubs of the native module built from rust_core/crates/vhdcore-py."""

from collections.abc import Callable
from typing import Any, Literal, final

DiskType = Literal["fixed", "dynamic", "differencing"]
ExportFormat = Literal["raw", "vhd"]

DEFAULT_BLOCK_SIZE: int
MAX_CHAIN_DEPTH: int
MAX_VIRTUAL_SIZE: int

class VhdError(Exception):
    """Root of every error vhdcore raises. `kind` is a stable machine name."""

    kind: str
    path: str | None
    field: str | None
    offset: int | None

class VhdIoError(VhdError): ...
class VhdFormatError(VhdError): ...
class ChecksumError(VhdFormatError): ...
class TruncatedError(VhdFormatError): ...
class BatError(VhdFormatError): ...
class UnsupportedError(VhdFormatError): ...
class ChainError(VhdError): ...
class MissingParentError(ChainError): ...
class ParentMismatchError(ChainError): ...
class ChainCycleError(ChainError): ...
class ChainTooDeepError(ChainError): ...
class InvalidArgumentError(VhdError): ...

@final
class Layer:
    path: str
    disk_type: DiskType
    virtual_size: int
    file_size: int
    block_size: int | None
    max_table_entries: int
    allocated_blocks: int
    uuid: str
    timestamp: int
    creator_app: str
    legacy_footer: bool
    parent_uuid: str | None
    parent_name: str | None
    parent_timestamp: int | None
    def to_dict(self) -> dict[str, Any]: ...

@final
class Extent:
    start: int
    length: int
    layer: int | None
    """Index into Chain.layers (0 = leaf), or None when no layer holds the range (reads as zeros)."""

@final
class ExportStats:
    format: str
    virtual_size: int
    bytes_written: int
    data_bytes: int
    zero_bytes: int
    seconds: float

@final
class Diff:
    ranges: list[tuple[int, int]]
    total: int
    shared_layers: int

@final
class Problem:
    kind: str
    path: str
    field: str | None
    offset: int | None
    message: str

@final
class Chain:
    layers: list[Layer]
    virtual_size: int
    warnings: list[str]
    @property
    def depth(self) -> int: ...
    @property
    def leaf(self) -> Layer: ...
    def map(self) -> list[Extent]: ...
    def read(self, offset: int, length: int) -> bytes: ...
    def export(
        self,
        out: str,
        format: ExportFormat = "raw",
        progress: Callable[[int, int], None] | None = None,
    ) -> ExportStats: ...

def open_chain(path: str, max_depth: int = 30) -> Chain: ...
def check(path: str, max_depth: int = 30) -> list[Problem]: ...
def diff(old: str, new: str, max_depth: int = 30) -> Diff: ...
def create(
    path: str, size: int, disk_type: Literal["fixed", "dynamic"] = "dynamic", block_size: int = ...
) -> Layer: ...
def snapshot(parent: str, child: str) -> Layer: ...
def write(path: str, offset: int, data: bytes) -> None: ...
