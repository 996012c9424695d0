"""An independent, pure-Python VHD reader and writer used by the tests as a second opinion.

It follows the Microsoft "Virtual Hard Disk Image Format Specification" (v1.0) and the facts of DESIGN.md §7,
and deliberately shares no code with `vhdcore`:

- reading: footer (512-byte, or the 511-byte legacy footer of old Virtual PC images), dynamic header, BAT, sector
  bitmaps, parent locators; chain resolution from a leaf; flattening (a differencing bitmap bit set = the sector is
  in this layer, else in the parent; an allocated block of a fixed/dynamic disk is fully data, as qemu reads it);
- writing: fixed, dynamic and differencing disks with full control of the layout (block order, gaps, alignment,
  locators, their data space unit, legacy footer, bitmaps, creator application);
- corrupting: set any footer/header field or BAT entry, with or without fixing the checksum.

Everything is small and slow on purpose: it is a reference, not a product.
"""

from __future__ import annotations

import os
import random
import struct
import urllib.parse
import uuid as uuidlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

SECTOR = 512
FOOTER_SIZE = 512
LEGACY_FOOTER_SIZE = 511
HEADER_SIZE = 1024
LOCATOR_COUNT = 8
LOCATOR_ENTRY_SIZE = 24
UNALLOCATED = 0xFFFFFFFF
DEFAULT_BLOCK_SIZE = 2 * 1024 * 1024
MAX_VIRTUAL_SIZE = 2040 * 1024**3

FOOTER_COOKIE = b"conectix"
HEADER_COOKIE = b"cxsparse"

DISK_FIXED = 2
DISK_DYNAMIC = 3
DISK_DIFFERENCING = 4
DISK_TYPE_NAMES = {DISK_FIXED: "fixed", DISK_DYNAMIC: "dynamic", DISK_DIFFERENCING: "differencing"}

# Seconds between the Unix epoch and the VHD epoch (2000-01-01 00:00:00 UTC).
VHD_EPOCH = 946_684_800

PLATFORM_W2RU = b"W2ru"
PLATFORM_W2KU = b"W2ku"
PLATFORM_MACX = b"MacX"
PLATFORM_NONE = b"\0\0\0\0"

DiskTypeName = Literal["fixed", "dynamic", "differencing"]


class PyVhdError(Exception):
    """Raised by the reference reader when a file is not a VHD it understands."""


# --------------------------------------------------------------------------------------------------------------
# On-disk structures
# --------------------------------------------------------------------------------------------------------------

# name -> (offset, struct format) of every footer field.
FOOTER_FIELDS: dict[str, tuple[int, str]] = {
    "cookie": (0, "8s"),
    "features": (8, ">I"),
    "format_version": (12, ">I"),
    "data_offset": (16, ">Q"),
    "timestamp": (24, ">I"),
    "creator_app": (28, "4s"),
    "creator_version": (32, ">I"),
    "creator_os": (36, "4s"),
    "original_size": (40, ">Q"),
    "current_size": (48, ">Q"),
    "cylinders": (56, ">H"),
    "heads": (58, "B"),
    "sectors_per_track": (59, "B"),
    "disk_type": (60, ">I"),
    "checksum": (64, ">I"),
    "uuid": (68, "16s"),
    "saved_state": (84, "B"),
}
FOOTER_CHECKSUM_OFFSET = 64

# name -> (offset, struct format) of every dynamic header field (locators: see LOCATOR_FIELDS).
HEADER_FIELDS: dict[str, tuple[int, str]] = {
    "cookie": (0, "8s"),
    "data_offset": (8, ">Q"),
    "table_offset": (16, ">Q"),
    "header_version": (24, ">I"),
    "max_table_entries": (28, ">I"),
    "block_size": (32, ">I"),
    "checksum": (36, ">I"),
    "parent_uuid": (40, "16s"),
    "parent_timestamp": (56, ">I"),
    "reserved1": (60, ">I"),
    "parent_name": (64, "512s"),
}
HEADER_CHECKSUM_OFFSET = 36
HEADER_LOCATORS_OFFSET = 576

LOCATOR_FIELDS: dict[str, tuple[int, str]] = {
    "code": (0, "4s"),
    "data_space": (4, ">I"),
    "data_length": (8, ">I"),
    "reserved": (12, ">I"),
    "data_offset": (16, ">Q"),
}


def vhd_checksum(data: bytes, checksum_offset: int) -> int:
    """One's complement of the byte sum of `data` with the 4-byte checksum field taken out."""
    total = sum(data) - sum(data[checksum_offset : checksum_offset + 4])
    return (~total) & 0xFFFFFFFF


def _get(buf: bytes, fields: Mapping[str, tuple[int, str]], name: str) -> int | bytes:
    off, fmt = fields[name]
    value: int | bytes = struct.unpack_from(fmt, buf, off)[0]
    return value


def _put(buf: bytearray, fields: Mapping[str, tuple[int, str]], name: str, value: int | bytes) -> None:
    off, fmt = fields[name]
    struct.pack_into(fmt, buf, off, value)


def chs_geometry(size: int) -> tuple[int, int, int]:
    """CHS geometry of the VHD specification (appendix "CHS calculation") for a disk of `size` bytes."""
    total = size // SECTOR
    if total > 65535 * 16 * 255:
        total = 65535 * 16 * 255
    if total >= 65535 * 16 * 63:
        spt, heads = 255, 16
        cyl_heads = total // spt
    else:
        spt = 17
        cyl_heads = total // spt
        heads = (cyl_heads + 1023) // 1024
        if heads < 4:
            heads = 4
        if cyl_heads >= heads * 1024 or heads > 16:
            spt, heads = 31, 16
            cyl_heads = total // spt
        if cyl_heads >= heads * 1024:
            spt, heads = 63, 16
            cyl_heads = total // spt
    return cyl_heads // heads, heads, spt


@dataclass
class Footer:
    """The hard disk footer (512 bytes; the legacy footer is the same without its last reserved byte)."""

    disk_type: int
    current_size: int
    original_size: int | None = None
    data_offset: int = 0xFFFFFFFFFFFFFFFF
    timestamp: int = 0
    creator_app: bytes = b"pyvd"
    creator_version: int = 0x00010000
    creator_os: bytes = b"Wi2k"
    features: int = 2
    format_version: int = 0x00010000
    geometry: tuple[int, int, int] | None = None
    uuid: bytes = field(default_factory=lambda: uuidlib.uuid4().bytes)
    saved_state: int = 0
    cookie: bytes = FOOTER_COOKIE
    checksum: int | None = None  # None: computed when packed
    legacy: bool = False  # parsed from (or to be written as) a 511-byte footer

    def pack(self) -> bytes:
        """512 bytes (the caller drops the last byte for a legacy footer)."""
        buf = bytearray(FOOTER_SIZE)
        cyl, heads, spt = self.geometry if self.geometry is not None else chs_geometry(self.current_size)
        values: dict[str, int | bytes] = {
            "cookie": self.cookie,
            "features": self.features,
            "format_version": self.format_version,
            "data_offset": self.data_offset,
            "timestamp": self.timestamp,
            "creator_app": self.creator_app,
            "creator_version": self.creator_version,
            "creator_os": self.creator_os,
            "original_size": self.current_size if self.original_size is None else self.original_size,
            "current_size": self.current_size,
            "cylinders": cyl,
            "heads": heads,
            "sectors_per_track": spt,
            "disk_type": self.disk_type,
            "checksum": 0,
            "uuid": self.uuid,
            "saved_state": self.saved_state,
        }
        for name, value in values.items():
            _put(buf, FOOTER_FIELDS, name, value)
        checksum = vhd_checksum(bytes(buf), FOOTER_CHECKSUM_OFFSET) if self.checksum is None else self.checksum
        _put(buf, FOOTER_FIELDS, "checksum", checksum)
        return bytes(buf)

    @classmethod
    def unpack(cls, raw: bytes, *, legacy: bool = False) -> Footer:
        if len(raw) == LEGACY_FOOTER_SIZE:
            raw = raw + b"\0"
        if len(raw) != FOOTER_SIZE:
            raise PyVhdError(f"footer must be 512 bytes, got {len(raw)}")

        def g(name: str) -> int | bytes:
            return _get(raw, FOOTER_FIELDS, name)

        return cls(
            cookie=_b(g("cookie")),
            features=_i(g("features")),
            format_version=_i(g("format_version")),
            data_offset=_i(g("data_offset")),
            timestamp=_i(g("timestamp")),
            creator_app=_b(g("creator_app")),
            creator_version=_i(g("creator_version")),
            creator_os=_b(g("creator_os")),
            original_size=_i(g("original_size")),
            current_size=_i(g("current_size")),
            geometry=(_i(g("cylinders")), _i(g("heads")), _i(g("sectors_per_track"))),
            disk_type=_i(g("disk_type")),
            checksum=_i(g("checksum")),
            uuid=_b(g("uuid")),
            saved_state=_i(g("saved_state")),
            legacy=legacy,
        )


@dataclass
class LocatorEntry:
    """One of the eight parent locator entries of the dynamic header."""

    code: bytes = PLATFORM_NONE
    data_space: int = 0
    data_length: int = 0
    data_offset: int = 0

    def pack(self) -> bytes:
        return struct.pack(">4sIIIQ", self.code, self.data_space, self.data_length, 0, self.data_offset)

    @classmethod
    def unpack(cls, raw: bytes) -> LocatorEntry:
        code, space, length, _reserved, offset = struct.unpack(">4sIIIQ", raw)
        return cls(code=code, data_space=space, data_length=length, data_offset=offset)


@dataclass
class DynamicHeader:
    """The 1024-byte dynamic disk header."""

    table_offset: int
    max_table_entries: int
    block_size: int = DEFAULT_BLOCK_SIZE
    parent_uuid: bytes = b"\0" * 16
    parent_timestamp: int = 0
    parent_name: str = ""
    locators: list[LocatorEntry] = field(default_factory=list)
    data_offset: int = 0xFFFFFFFFFFFFFFFF
    header_version: int = 0x00010000
    cookie: bytes = HEADER_COOKIE
    checksum: int | None = None  # None: computed when packed
    parent_name_raw: bytes | None = None  # overrides parent_name (UTF-16BE) when set

    def pack(self) -> bytes:
        buf = bytearray(HEADER_SIZE)
        name_raw = self.parent_name_raw
        if name_raw is None:
            name_raw = self.parent_name.encode("utf-16-be")
        if len(name_raw) > 512:
            raise ValueError("parent name longer than 256 UTF-16 code units")
        values: dict[str, int | bytes] = {
            "cookie": self.cookie,
            "data_offset": self.data_offset,
            "table_offset": self.table_offset,
            "header_version": self.header_version,
            "max_table_entries": self.max_table_entries,
            "block_size": self.block_size,
            "checksum": 0,
            "parent_uuid": self.parent_uuid,
            "parent_timestamp": self.parent_timestamp,
            "reserved1": 0,
            "parent_name": name_raw,
        }
        for name, value in values.items():
            _put(buf, HEADER_FIELDS, name, value)
        if len(self.locators) > LOCATOR_COUNT:
            raise ValueError("at most 8 parent locators")
        for i, loc in enumerate(self.locators):
            off = HEADER_LOCATORS_OFFSET + i * LOCATOR_ENTRY_SIZE
            buf[off : off + LOCATOR_ENTRY_SIZE] = loc.pack()
        checksum = vhd_checksum(bytes(buf), HEADER_CHECKSUM_OFFSET) if self.checksum is None else self.checksum
        _put(buf, HEADER_FIELDS, "checksum", checksum)
        return bytes(buf)

    @classmethod
    def unpack(cls, raw: bytes) -> DynamicHeader:
        if len(raw) != HEADER_SIZE:
            raise PyVhdError(f"dynamic header must be 1024 bytes, got {len(raw)}")

        def g(name: str) -> int | bytes:
            return _get(raw, HEADER_FIELDS, name)

        name_raw = _b(g("parent_name"))
        locators = [
            LocatorEntry.unpack(raw[off : off + LOCATOR_ENTRY_SIZE])
            for off in range(HEADER_LOCATORS_OFFSET, HEADER_LOCATORS_OFFSET + LOCATOR_COUNT * LOCATOR_ENTRY_SIZE, 24)
        ]
        return cls(
            cookie=_b(g("cookie")),
            data_offset=_i(g("data_offset")),
            table_offset=_i(g("table_offset")),
            header_version=_i(g("header_version")),
            max_table_entries=_i(g("max_table_entries")),
            block_size=_i(g("block_size")),
            checksum=_i(g("checksum")),
            parent_uuid=_b(g("parent_uuid")),
            parent_timestamp=_i(g("parent_timestamp")),
            parent_name=decode_utf16(name_raw, "utf-16-be"),
            parent_name_raw=name_raw,
            locators=locators,
        )


def _i(value: int | bytes) -> int:
    assert isinstance(value, int)
    return value


def _b(value: int | bytes) -> bytes:
    assert isinstance(value, bytes)
    return value


def decode_utf16(raw: bytes, encoding: Literal["utf-16-be", "utf-16-le"]) -> str:
    """Decode a NUL-padded UTF-16 string (stops at the first NUL code unit)."""
    units = len(raw) // 2
    end = units
    for i in range(units):
        if raw[2 * i] == 0 and raw[2 * i + 1] == 0:
            end = i
            break
    return raw[: 2 * end].decode(encoding, errors="replace")


def bitmap_size(block_size: int) -> int:
    """Bytes of the sector bitmap that precedes each block's data (one bit per sector, padded to a sector)."""
    sectors = block_size // SECTOR
    nbytes = (sectors + 7) // 8
    return (nbytes + SECTOR - 1) // SECTOR * SECTOR


def bit_is_set(bitmap: bytes, index: int) -> bool:
    """MSB-first bit `index` of `bitmap`."""
    return bool(bitmap[index >> 3] & (0x80 >> (index & 7)))


def set_bit(bitmap: bytearray, index: int) -> None:
    bitmap[index >> 3] |= 0x80 >> (index & 7)


def vhd_timestamp(unix_seconds: float | None = None) -> int:
    """Seconds since 2000-01-01 UTC (the VHD epoch)."""
    import time

    now = time.time() if unix_seconds is None else unix_seconds
    return max(0, int(now) - VHD_EPOCH) & 0xFFFFFFFF


def format_uuid(raw: bytes) -> str:
    return str(uuidlib.UUID(bytes=raw))


# --------------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Locator:
    """A decoded parent locator."""

    index: int
    code: bytes
    data_space: int
    data_length: int
    data_offset: int
    raw: bytes
    path: str | None  # decoded path (W2ru/W2ku: UTF-16LE; MacX: UTF-8 file URL -> path), None if undecodable


def decode_locator_path(code: bytes, raw: bytes) -> str | None:
    """Turn locator data into a path (POSIX separators); None for unknown platform codes."""
    if code in (PLATFORM_W2RU, PLATFORM_W2KU):
        text = raw.decode("utf-16-le", errors="replace").rstrip("\0")
        return text.replace("\\", "/")
    if code == PLATFORM_MACX:
        text = raw.decode("utf-8", errors="replace").rstrip("\0")
        if text.startswith("file://"):
            text = text[len("file://") :]
        return urllib.parse.unquote(text)
    return None


class VhdFile:
    """One VHD file, parsed eagerly (footer, header, BAT, locators) and read lazily (bitmaps, data)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.file_size = self.path.stat().st_size
        self.footer, self.footer_offset = self._read_footer()
        self.header: DynamicHeader | None = None
        self.bat: list[int] = []
        self.locators: list[Locator] = []
        if self.footer.disk_type in (DISK_DYNAMIC, DISK_DIFFERENCING):
            self._read_dynamic()
        elif self.footer.disk_type != DISK_FIXED:
            raise PyVhdError(f"{self.path}: unknown disk type {self.footer.disk_type}")

    # -- parsing -------------------------------------------------------------------------------------------

    def _read_footer(self) -> tuple[Footer, int]:
        tail = self._pread(max(0, self.file_size - FOOTER_SIZE), FOOTER_SIZE)
        if len(tail) == FOOTER_SIZE and tail[:8] == FOOTER_COOKIE:
            raw, offset, legacy = tail, self.file_size - FOOTER_SIZE, False
        else:
            raw = self._pread(max(0, self.file_size - LEGACY_FOOTER_SIZE), LEGACY_FOOTER_SIZE)
            if len(raw) != LEGACY_FOOTER_SIZE or raw[:8] != FOOTER_COOKIE:
                raise PyVhdError(f"{self.path}: no footer cookie at the end of the file")
            offset, legacy = self.file_size - LEGACY_FOOTER_SIZE, True
        footer = Footer.unpack(raw, legacy=legacy)
        expected = vhd_checksum(raw, FOOTER_CHECKSUM_OFFSET)
        if footer.checksum != expected:
            raise PyVhdError(f"{self.path}: footer checksum {footer.checksum:#x} != {expected:#x}")
        if footer.current_size % SECTOR:
            raise PyVhdError(f"{self.path}: current size {footer.current_size} is not a multiple of 512")
        return footer, offset

    def _pread(self, offset: int, length: int) -> bytes:
        with self.path.open("rb") as fh:
            fh.seek(offset)
            return fh.read(length)

    def _read_dynamic(self) -> None:
        hoff = self.footer.data_offset
        raw = self._pread(hoff, HEADER_SIZE)
        if len(raw) != HEADER_SIZE:
            raise PyVhdError(f"{self.path}: dynamic header truncated")
        header = DynamicHeader.unpack(raw)
        if header.cookie != HEADER_COOKIE:
            raise PyVhdError(f"{self.path}: bad header cookie {header.cookie!r}")
        if header.checksum != vhd_checksum(raw, HEADER_CHECKSUM_OFFSET):
            raise PyVhdError(f"{self.path}: bad header checksum")
        bs = header.block_size
        if bs < SECTOR or bs & (bs - 1):
            raise PyVhdError(f"{self.path}: block size {bs} is not a power of two >= 512")
        needed = (self.footer.current_size + bs - 1) // bs
        if header.max_table_entries < needed or header.max_table_entries > 1 << 24:
            raise PyVhdError(f"{self.path}: max_table_entries {header.max_table_entries} (need {needed})")
        bat_raw = self._pread(header.table_offset, 4 * header.max_table_entries)
        if len(bat_raw) != 4 * header.max_table_entries:
            raise PyVhdError(f"{self.path}: BAT truncated")
        self.header = header
        self.bat = list(struct.unpack(f">{header.max_table_entries}I", bat_raw))
        bms = bitmap_size(bs)
        for i, entry in enumerate(self.bat):
            if entry != UNALLOCATED and entry * SECTOR + bms + bs > self.footer_offset:
                raise PyVhdError(f"{self.path}: bat[{i}] = {entry} points past the end")
        for i, loc in enumerate(header.locators):
            if loc.code == PLATFORM_NONE or loc.data_length == 0:
                continue
            data = self._pread(loc.data_offset, loc.data_length)
            self.locators.append(
                Locator(
                    index=i,
                    code=loc.code,
                    data_space=loc.data_space,
                    data_length=loc.data_length,
                    data_offset=loc.data_offset,
                    raw=data,
                    path=decode_locator_path(loc.code, data),
                )
            )

    # -- properties ----------------------------------------------------------------------------------------

    @property
    def disk_type(self) -> int:
        return self.footer.disk_type

    @property
    def disk_type_name(self) -> DiskTypeName:
        name = DISK_TYPE_NAMES[self.footer.disk_type]
        assert name in ("fixed", "dynamic", "differencing")
        return name  # type: ignore[return-value]

    @property
    def virtual_size(self) -> int:
        return self.footer.current_size

    @property
    def uuid(self) -> str:
        return format_uuid(self.footer.uuid)

    @property
    def block_size(self) -> int | None:
        return self.header.block_size if self.header is not None else None

    @property
    def parent_uuid(self) -> str | None:
        if self.footer.disk_type != DISK_DIFFERENCING or self.header is None:
            return None
        return format_uuid(self.header.parent_uuid)

    @property
    def allocated_blocks(self) -> int:
        return sum(1 for e in self.bat if e != UNALLOCATED)

    def parent_candidates(self) -> list[Path]:
        """Where the parent may be: header parent name, then the locators, relative to this file's folder."""
        if self.header is None:
            return []
        base = self.path.parent
        names: list[str] = []
        if self.header.parent_name:
            names.append(self.header.parent_name)
        names.extend(loc.path for loc in self.locators if loc.path)
        out: list[Path] = []
        for name in names:
            candidate = Path(name) if Path(name).is_absolute() else base / name
            if candidate not in out:
                out.append(candidate)
        return out

    # -- data ----------------------------------------------------------------------------------------------

    def block_bitmap(self, block: int) -> bytes | None:
        """The sector bitmap of `block`, or None if the block is not allocated (dynamic/differencing only)."""
        assert self.header is not None
        if block >= len(self.bat) or self.bat[block] == UNALLOCATED:
            return None
        return self._pread(self.bat[block] * SECTOR, bitmap_size(self.header.block_size))

    def block_data(self, block: int) -> bytes:
        assert self.header is not None
        bs = self.header.block_size
        off = self.bat[block] * SECTOR + bitmap_size(bs)
        return self._pread(off, bs)

    def present_runs(self, start_sector: int, end_sector: int) -> Iterator[tuple[int, int, bytes]]:
        """Yield (first_sector, sector_count, data) for every run of sectors this layer holds in [start, end)."""
        if start_sector >= end_sector:
            return
        if self.footer.disk_type == DISK_FIXED:
            yield (
                start_sector,
                end_sector - start_sector,
                self._pread(start_sector * SECTOR, (end_sector - start_sector) * SECTOR),
            )
            return
        assert self.header is not None
        spb = self.header.block_size // SECTOR
        differencing = self.footer.disk_type == DISK_DIFFERENCING
        for block in range(start_sector // spb, (end_sector - 1) // spb + 1):
            bitmap = self.block_bitmap(block)
            if bitmap is None:
                continue
            lo = max(start_sector, block * spb)
            hi = min(end_sector, (block + 1) * spb)
            data = self.block_data(block)
            if not differencing:
                # qemu's rule, and ours: an allocated block of a dynamic disk is data in full.
                yield lo, hi - lo, data[(lo - block * spb) * SECTOR : (hi - block * spb) * SECTOR]
                continue
            s = lo
            while s < hi:
                i = s - block * spb
                if not bit_is_set(bitmap, i):
                    s += 1
                    continue
                run_end = s + 1
                while run_end < hi and bit_is_set(bitmap, run_end - block * spb):
                    run_end += 1
                yield s, run_end - s, data[i * SECTOR : (run_end - block * spb) * SECTOR]
                s = run_end


class PyChain:
    """A chain resolved from its leaf: layers[0] is the leaf, layers[-1] the base (like vhdcore)."""

    def __init__(self, leaf: str | os.PathLike[str], max_depth: int = 64) -> None:
        self.layers: list[VhdFile] = []
        self.warnings: list[str] = []
        current = VhdFile(leaf)
        seen: set[str] = set()
        while True:
            key = os.path.realpath(current.path)
            if key in seen:
                raise PyVhdError(f"parent cycle at {current.path}")
            seen.add(key)
            self.layers.append(current)
            if len(self.layers) > max_depth:
                raise PyVhdError(f"chain deeper than {max_depth}")
            if current.disk_type != DISK_DIFFERENCING:
                break
            current = self._find_parent(current)
        self.virtual_size = self.layers[0].virtual_size

    def _find_parent(self, child: VhdFile) -> VhdFile:
        assert child.header is not None
        wanted = child.parent_uuid
        for candidate in child.parent_candidates():
            if not candidate.is_file():
                continue
            parent = VhdFile(candidate)
            if parent.uuid == wanted:
                if child.header.parent_timestamp == 0:
                    self.warnings.append(f"{child.path.name}: zero parent timestamp")
                return parent
        raise PyVhdError(f"{child.path}: parent {wanted} not found among {child.parent_candidates()}")

    @property
    def depth(self) -> int:
        return len(self.layers)

    def read(self, offset: int, length: int) -> bytes:
        """Bytes of the flattened disk (any offset and length inside the disk)."""
        if offset < 0 or length < 0 or offset + length > self.virtual_size:
            raise ValueError("read past the end of the disk")
        if length == 0:
            return b""
        first = offset // SECTOR
        last = (offset + length + SECTOR - 1) // SECTOR
        buf = bytearray((last - first) * SECTOR)
        for layer in reversed(self.layers):  # base first, leaf last: upper layers overwrite
            for s, n, data in layer.present_runs(first, last):
                buf[(s - first) * SECTOR : (s - first + n) * SECTOR] = data
        skip = offset - first * SECTOR
        return bytes(buf[skip : skip + length])

    def flatten(self) -> bytes:
        return self.read(0, self.virtual_size)

    def owners(self) -> list[int | None]:
        """Per sector: index (leaf first) of the topmost layer that holds it, or None."""
        nsect = self.virtual_size // SECTOR
        owner: list[int | None] = [None] * nsect
        for idx in range(len(self.layers) - 1, -1, -1):
            for s, n, _data in self.layers[idx].present_runs(0, nsect):
                owner[s : s + n] = [idx] * n
        return owner


def flatten(leaf: str | os.PathLike[str]) -> bytes:
    return PyChain(leaf).flatten()


# --------------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------------


@dataclass
class LocatorSpec:
    """A parent locator to write: platform code and the text it holds (encoded per platform code)."""

    code: bytes
    text: str
    space_unit: Literal["bytes", "sectors"] = "bytes"
    space_sectors: int = 1  # reserved data space, in sectors (written as sectors or bytes per space_unit)

    def encoded(self) -> bytes:
        if self.code in (PLATFORM_W2RU, PLATFORM_W2KU):
            return self.text.encode("utf-16-le")
        return self.text.encode("utf-8")


def w2ku(path: str, space_unit: Literal["bytes", "sectors"] = "bytes", space_sectors: int = 1) -> LocatorSpec:
    """W2ku locator: a UTF-16LE path (Windows absolute or relative, as the writer gives it)."""
    return LocatorSpec(PLATFORM_W2KU, path, space_unit, space_sectors)


def w2ru(path: str, space_unit: Literal["bytes", "sectors"] = "bytes", space_sectors: int = 1) -> LocatorSpec:
    """W2ru locator: a UTF-16LE relative path."""
    return LocatorSpec(PLATFORM_W2RU, path, space_unit, space_sectors)


def macx(path: str, space_unit: Literal["bytes", "sectors"] = "bytes", space_sectors: int = 1) -> LocatorSpec:
    """MacX locator: a UTF-8 file URL (relative paths are written as file://./name, as blktap does)."""
    if path.startswith("file://"):
        url = path
    elif Path(path).is_absolute():
        url = "file://" + urllib.parse.quote(path)
    else:
        url = "file://" + (path if path.startswith(("./", "../")) else "./" + path)
    return LocatorSpec(PLATFORM_MACX, url, space_unit, space_sectors)


@dataclass
class ParentSpec:
    """The parent fields of a differencing disk's header."""

    uuid: bytes
    timestamp: int = 0
    name: str = ""
    locators: list[LocatorSpec] = field(default_factory=list)

    @classmethod
    def of(
        cls,
        parent: str | os.PathLike[str],
        *,
        name: str | None = None,
        locators: Sequence[LocatorSpec] | None = None,
        timestamp: int | None = None,
    ) -> ParentSpec:
        """Parent fields pointing at an existing VHD: its UUID, its footer timestamp, its file name."""
        vf = VhdFile(parent)
        pname = Path(parent).name if name is None else name
        locs = list(locators) if locators is not None else [w2ku(pname), w2ru(pname)]
        return cls(
            uuid=vf.footer.uuid,
            timestamp=vf.footer.timestamp if timestamp is None else timestamp,
            name=pname,
            locators=locs,
        )


BlockOrder = Literal["ascending", "descending", "shuffled"]


@dataclass
class Layout:
    """Where `build_dynamic` put things (file offsets in bytes), for tests that corrupt or assert offsets."""

    file_size: int
    footer_offset: int
    header_offset: int = FOOTER_SIZE
    table_offset: int = 0
    bat_bytes: int = 0
    block_offsets: dict[int, int] = field(default_factory=dict)  # block index -> offset of its bitmap
    locator_offsets: list[int] = field(default_factory=list)
    bitmap_size: int = 0


@dataclass
class DynamicSpec:
    """Everything `build_dynamic` needs. `sectors` maps a sector number to its 512 bytes in this layer.

    For a dynamic (non-differencing) disk, an allocated block is data in full: sectors of an allocated block that are
    not in `sectors` hold `unset_fill` bytes (zeros by default) and read as such. `extra_blocks` allocates blocks with
    no sector data. In a differencing disk the bitmap decides, whatever bytes the unset sectors hold.
    """

    virtual_size: int
    sectors: dict[int, bytes] = field(default_factory=dict)
    block_size: int = DEFAULT_BLOCK_SIZE
    parent: ParentSpec | None = None
    uuid: bytes = field(default_factory=lambda: uuidlib.uuid4().bytes)
    timestamp: int = field(default_factory=vhd_timestamp)
    creator_app: bytes = b"pyvd"
    legacy_footer: bool = False
    block_order: BlockOrder | list[int] = "ascending"
    block_align: int = SECTOR  # 4096 for blktap-like layouts
    gap_sectors: int = 0  # unused sectors left between blocks (not packed)
    bitmap_mode: Literal["exact", "full"] = "exact"  # full: every bit set (qemu's dynamic disks)
    max_table_entries: int | None = None
    extra_blocks: set[int] = field(default_factory=set)
    unset_fill: int = 0  # byte stored in the data of allocated blocks' sectors that `sectors` does not give
    seed: int = 0  # for "shuffled"

    @property
    def disk_type(self) -> int:
        return DISK_DIFFERENCING if self.parent is not None else DISK_DYNAMIC


def _align(value: int, to: int) -> int:
    return (value + to - 1) // to * to


def _footer_bytes(footer: Footer, legacy: bool) -> bytes:
    raw = footer.pack()
    return raw[:LEGACY_FOOTER_SIZE] if legacy else raw


def build_fixed(
    virtual_size: int,
    data: bytes | None = None,
    *,
    uuid: bytes | None = None,
    timestamp: int | None = None,
    creator_app: bytes = b"pyvd",
    legacy_footer: bool = False,
) -> bytes:
    """A fixed VHD: the disk's bytes followed by the footer (511 bytes when `legacy_footer`)."""
    if virtual_size % SECTOR:
        raise ValueError("virtual size must be a multiple of 512")
    body = bytearray(virtual_size)
    if data is not None:
        body[: len(data)] = data[:virtual_size]
    footer = Footer(
        disk_type=DISK_FIXED,
        current_size=virtual_size,
        data_offset=0xFFFFFFFFFFFFFFFF,
        timestamp=vhd_timestamp() if timestamp is None else timestamp,
        creator_app=creator_app,
        uuid=uuid if uuid is not None else uuidlib.uuid4().bytes,
    )
    return bytes(body) + _footer_bytes(footer, legacy_footer)


def build_dynamic(spec: DynamicSpec) -> tuple[bytes, Layout]:
    """A dynamic or differencing VHD laid out as `spec` says; returns its bytes and where things are."""
    bs = spec.block_size
    if spec.virtual_size % SECTOR:
        raise ValueError("virtual size must be a multiple of 512")
    spb = bs // SECTOR
    nblocks = (spec.virtual_size + bs - 1) // bs
    entries = nblocks if spec.max_table_entries is None else spec.max_table_entries
    bms = bitmap_size(bs)

    # Group sectors by block.
    per_block: dict[int, dict[int, bytes]] = {}
    for s, payload in spec.sectors.items():
        if not 0 <= s < spec.virtual_size // SECTOR:
            raise ValueError(f"sector {s} outside the disk")
        if len(payload) != SECTOR:
            raise ValueError("sector payloads must be 512 bytes")
        per_block.setdefault(s // spb, {})[s % spb] = payload
    for b in spec.extra_blocks:
        per_block.setdefault(b, {})
    blocks = sorted(per_block)
    if spec.block_order == "descending":
        blocks.reverse()
    elif spec.block_order == "shuffled":
        random.Random(spec.seed).shuffle(blocks)
    elif isinstance(spec.block_order, list):
        if sorted(spec.block_order) != blocks:
            raise ValueError("block_order must be a permutation of the allocated blocks")
        blocks = list(spec.block_order)

    layout = Layout(file_size=0, footer_offset=0, bitmap_size=bms)
    header_offset = FOOTER_SIZE
    table_offset = header_offset + HEADER_SIZE
    bat_bytes = _align(4 * entries, SECTOR)
    pos = table_offset + bat_bytes

    # Parent locator data after the BAT.
    entries_out: list[LocatorEntry] = []
    locator_payloads: list[tuple[int, bytes]] = []
    if spec.parent is not None:
        for loc in spec.parent.locators:
            payload = loc.encoded()
            space_sectors = max(loc.space_sectors, _align(len(payload), SECTOR) // SECTOR)
            space = space_sectors if loc.space_unit == "sectors" else space_sectors * SECTOR
            entries_out.append(LocatorEntry(loc.code, space, len(payload), pos))
            locator_payloads.append((pos, payload))
            layout.locator_offsets.append(pos)
            pos += space_sectors * SECTOR

    bat = [UNALLOCATED] * entries
    for b in blocks:
        pos = _align(pos, SECTOR)
        # blktap aligns the block's *data* (after the bitmap) to 4 KiB.
        while (pos + bms) % spec.block_align:
            pos += SECTOR
        bat[b] = pos // SECTOR
        layout.block_offsets[b] = pos
        pos += bms + bs + spec.gap_sectors * SECTOR

    footer_offset = pos
    out = bytearray(footer_offset)
    footer = Footer(
        disk_type=spec.disk_type,
        current_size=spec.virtual_size,
        data_offset=header_offset,
        timestamp=spec.timestamp,
        creator_app=spec.creator_app,
        uuid=spec.uuid,
    )
    out[0:FOOTER_SIZE] = footer.pack()
    header = DynamicHeader(
        table_offset=table_offset,
        max_table_entries=entries,
        block_size=bs,
        parent_uuid=spec.parent.uuid if spec.parent else b"\0" * 16,
        parent_timestamp=spec.parent.timestamp if spec.parent else 0,
        parent_name=spec.parent.name if spec.parent else "",
        locators=entries_out,
    )
    out[header_offset : header_offset + HEADER_SIZE] = header.pack()
    bat_raw = b"".join(struct.pack(">I", e) for e in bat)
    out[table_offset : table_offset + bat_bytes] = bat_raw.ljust(bat_bytes, b"\xff")
    for off, payload in locator_payloads:
        out[off : off + len(payload)] = payload
    for b in blocks:
        start = layout.block_offsets[b]
        bitmap = bytearray(bms)
        data = bytearray([spec.unset_fill]) * bs
        for i, payload in per_block[b].items():
            data[i * SECTOR : (i + 1) * SECTOR] = payload
            set_bit(bitmap, i)
        if spec.bitmap_mode == "full":
            bitmap[: (spb + 7) // 8] = b"\xff" * ((spb + 7) // 8)
        out[start : start + bms] = bitmap
        out[start + bms : start + bms + bs] = data
    out += _footer_bytes(footer, spec.legacy_footer)
    layout.file_size = len(out)
    layout.footer_offset = footer_offset
    layout.header_offset = header_offset
    layout.table_offset = table_offset
    layout.bat_bytes = bat_bytes
    return bytes(out), layout


def sectors_from_writes(writes: Iterable[tuple[int, bytes]], base: bytes | None = None) -> dict[int, bytes]:
    """Sector map of a layer that received `writes` (offset, data); partial sectors are completed from `base`
    (the flattened content below, zeros when None), like a read-modify-write."""
    out: dict[int, bytes] = {}
    for offset, data in writes:
        if not data:
            continue
        first = offset // SECTOR
        last = (offset + len(data) - 1) // SECTOR
        for s in range(first, last + 1):
            if s in out:
                cur = bytearray(out[s])
            elif base is not None:
                cur = bytearray(base[s * SECTOR : (s + 1) * SECTOR])
            else:
                cur = bytearray(SECTOR)
            lo = max(offset, s * SECTOR)
            hi = min(offset + len(data), (s + 1) * SECTOR)
            cur[lo - s * SECTOR : hi - s * SECTOR] = data[lo - offset : hi - offset]
            out[s] = bytes(cur)
    return out


def write_file(path: str | os.PathLike[str], data: bytes) -> Path:
    p = Path(path)
    p.write_bytes(data)
    return p


# --------------------------------------------------------------------------------------------------------------
# Corruption helpers
# --------------------------------------------------------------------------------------------------------------


def footer_offset_of(path: str | os.PathLike[str]) -> int:
    """Offset of the footer at the end of the file (a 512-byte footer, else a 511-byte legacy one)."""
    size = Path(path).stat().st_size
    with Path(path).open("rb") as fh:
        for footer_size in (FOOTER_SIZE, LEGACY_FOOTER_SIZE):
            if size >= footer_size:
                fh.seek(size - footer_size)
                if fh.read(8) == FOOTER_COOKIE:
                    return size - footer_size
    raise PyVhdError(f"{path}: no footer at the end")


def set_footer_field(
    path: str | os.PathLike[str],
    name: str,
    value: int | bytes,
    *,
    fix_checksum: bool = True,
    which: Literal["end", "copy", "both"] = "both",
) -> list[int]:
    """Set a footer field in the footer at the end and/or the copy at offset 0; returns the footers' offsets."""
    p = Path(path)
    data = bytearray(p.read_bytes())
    touched: list[int] = []
    end = footer_offset_of(p)
    targets: list[int] = []
    if which in ("end", "both"):
        targets.append(end)
    if which in ("copy", "both") and data[:8] == FOOTER_COOKIE and end != 0:
        targets.append(0)
    for off in targets:
        size = len(data) - off if off == end else FOOTER_SIZE
        raw = bytearray(bytes(data[off : off + size]).ljust(FOOTER_SIZE, b"\0"))
        _put(raw, FOOTER_FIELDS, name, value)
        if fix_checksum and name != "checksum":
            _put(raw, FOOTER_FIELDS, "checksum", vhd_checksum(bytes(raw), FOOTER_CHECKSUM_OFFSET))
        data[off : off + size] = raw[:size]
        touched.append(off)
    p.write_bytes(bytes(data))
    return touched


def set_header_field(path: str | os.PathLike[str], name: str, value: int | bytes, *, fix_checksum: bool = True) -> int:
    """Set a dynamic header field; returns the header's offset."""
    p = Path(path)
    data = bytearray(p.read_bytes())
    footer = Footer.unpack(bytes(data[footer_offset_of(p) :]))
    hoff = footer.data_offset
    raw = bytearray(data[hoff : hoff + HEADER_SIZE])
    _put(raw, HEADER_FIELDS, name, value)
    if fix_checksum and name != "checksum":
        _put(raw, HEADER_FIELDS, "checksum", vhd_checksum(bytes(raw), HEADER_CHECKSUM_OFFSET))
    data[hoff : hoff + HEADER_SIZE] = raw
    p.write_bytes(bytes(data))
    return hoff


def set_locator_field(
    path: str | os.PathLike[str], index: int, name: str, value: int | bytes, *, fix_checksum: bool = True
) -> int:
    """Set a field of parent locator entry `index`; returns the entry's file offset."""
    p = Path(path)
    data = bytearray(p.read_bytes())
    footer = Footer.unpack(bytes(data[footer_offset_of(p) :]))
    hoff = footer.data_offset
    raw = bytearray(data[hoff : hoff + HEADER_SIZE])
    off, fmt = LOCATOR_FIELDS[name]
    struct.pack_into(fmt, raw, HEADER_LOCATORS_OFFSET + index * LOCATOR_ENTRY_SIZE + off, value)
    if fix_checksum:
        _put(raw, HEADER_FIELDS, "checksum", vhd_checksum(bytes(raw), HEADER_CHECKSUM_OFFSET))
    data[hoff : hoff + HEADER_SIZE] = raw
    p.write_bytes(bytes(data))
    return hoff + HEADER_LOCATORS_OFFSET + index * LOCATOR_ENTRY_SIZE


def read_header(path: str | os.PathLike[str]) -> tuple[int, DynamicHeader]:
    p = Path(path)
    data = p.read_bytes()
    footer = Footer.unpack(data[footer_offset_of(p) :])
    hoff = footer.data_offset
    return hoff, DynamicHeader.unpack(data[hoff : hoff + HEADER_SIZE])


def set_bat_entry(path: str | os.PathLike[str], index: int, value: int) -> int:
    """Set BAT entry `index` (the BAT has no checksum); returns the entry's file offset."""
    _hoff, header = read_header(path)
    off = header.table_offset + 4 * index
    with Path(path).open("r+b") as fh:
        fh.seek(off)
        fh.write(struct.pack(">I", value))
    return off


def get_bat(path: str | os.PathLike[str]) -> list[int]:
    _hoff, header = read_header(path)
    with Path(path).open("rb") as fh:
        fh.seek(header.table_offset)
        raw = fh.read(4 * header.max_table_entries)
    return list(struct.unpack(f">{len(raw) // 4}I", raw))


def truncate(path: str | os.PathLike[str], size: int) -> None:
    with Path(path).open("r+b") as fh:
        fh.truncate(size)
