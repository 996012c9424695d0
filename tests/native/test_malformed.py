"""Acceptance 3: malformed input gives a typed error that names the field and its offset, never a panic, a hang or
an unbounded allocation; `check` lists every problem.

Each case is crafted with pyvhd and run in a child process (tests/support/isolate.py) under a timeout and an
address-space cap, so a hang, a crash or a runaway allocation fails the test instead of the session.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

import vhdcore
from tests.support import pyvhd
from tests.support.isolate import Outcome, run_isolated

pytestmark = pytest.mark.native

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
SECTOR = 512
HEADER_AT = 512  # pyvhd puts the dynamic header right after the footer copy


@dataclass
class Expect:
    """The error a case must raise."""

    cls: str
    kinds: tuple[str, ...]
    fields: tuple[str, ...]  # any of these (exact); ("*",): any field, but one must be named
    offsets: tuple[int | str | None, ...]  # any of these; None allows "no offset"; ("*",): any, but not None
    path: Path | None = None  # the file the error must name


def dynamic_disk(
    path: Path,
    size: int = 8 * MiB,
    blocks: tuple[int, ...] = (0, 2, 3),
    block_size: int = 2 * MiB,
    gap_sectors: int = 0,
) -> pyvhd.Layout:
    sectors = {b * (block_size // SECTOR) + 1: bytes([b + 1]) * SECTOR for b in blocks}
    spec = pyvhd.DynamicSpec(virtual_size=size, sectors=sectors, block_size=block_size, gap_sectors=gap_sectors)
    data, layout = pyvhd.build_dynamic(spec)
    path.write_bytes(data)
    return layout


def fixed_disk(path: Path, size: int = 2 * MiB) -> int:
    path.write_bytes(pyvhd.build_fixed(size, b"fixed data" * 100))
    return size  # the footer's offset


def child_of(path: Path, parent: Path, **spec: object) -> pyvhd.Layout:
    data, layout = pyvhd.build_dynamic(
        pyvhd.DynamicSpec(
            virtual_size=pyvhd.VhdFile(parent).virtual_size,
            parent=pyvhd.ParentSpec.of(parent),
            sectors={3: b"c" * SECTOR},
            **spec,  # type: ignore[arg-type]
        )
    )
    path.write_bytes(data)
    return layout


Case = Callable[[Path], tuple[Path, Expect]]
CASES: dict[str, Case] = {}


def case(fn: Case) -> Case:
    CASES[fn.__name__] = fn
    return fn


# -- footer ----------------------------------------------------------------------------------------------------


@case
def footer_bad_cookie_fixed(d: Path) -> tuple[Path, Expect]:
    p = d / "fixed.vhd"
    foot = fixed_disk(p)
    pyvhd.set_footer_field(p, "cookie", b"conectiX")
    return p, Expect("VhdFormatError", ("bad_cookie",), ("footer.cookie",), (foot,), p)


@case
def footer_bad_cookie_dynamic(d: Path) -> tuple[Path, Expect]:
    p = d / "dyn.vhd"
    layout = dynamic_disk(p)
    pyvhd.set_footer_field(p, "cookie", b"notavhd!")  # both copies
    return p, Expect("VhdFormatError", ("bad_cookie",), ("footer.cookie",), (layout.footer_offset,), p)


@case
def footer_bad_checksum(d: Path) -> tuple[Path, Expect]:
    p = d / "fixed.vhd"
    foot = fixed_disk(p)
    pyvhd.set_footer_field(p, "checksum", 0x12345678, fix_checksum=False)
    return p, Expect("ChecksumError", ("checksum",), ("footer.checksum",), (foot + 64,), p)


@case
def footer_field_changed_without_checksum(d: Path) -> tuple[Path, Expect]:
    p = d / "dyn.vhd"
    layout = dynamic_disk(p)
    pyvhd.set_footer_field(p, "current_size", 6 * MiB, fix_checksum=False)
    return p, Expect("ChecksumError", ("checksum",), ("footer.checksum",), (layout.footer_offset + 64,), p)


@case
def footer_unknown_disk_type(d: Path) -> tuple[Path, Expect]:
    p = d / "fixed.vhd"
    foot = fixed_disk(p)
    pyvhd.set_footer_field(p, "disk_type", 7)
    return p, Expect("VhdFormatError", ("invalid_field", "unsupported"), ("footer.disk_type",), (foot + 60,), p)


@case
def footer_virtual_size_over_2040_gib(d: Path) -> tuple[Path, Expect]:
    """A dynamic disk of 2041 GiB whose BAT is big enough: only the size is wrong."""
    p = d / "huge.vhd"
    data, layout = pyvhd.build_dynamic(pyvhd.DynamicSpec(virtual_size=2041 * GiB, sectors={0: b"x" * SECTOR}))
    p.write_bytes(data)
    return p, Expect(
        "VhdFormatError", ("invalid_field", "unsupported"), ("footer.current_size",), (layout.footer_offset + 48,), p
    )


@case
def fixed_virtual_size_over_2040_gib(d: Path) -> tuple[Path, Expect]:
    p = d / "fixed.vhd"
    foot = fixed_disk(p)
    pyvhd.set_footer_field(p, "current_size", 2041 * GiB)
    return p, Expect(
        "VhdFormatError",
        ("invalid_field", "unsupported", "truncated"),
        ("footer.current_size",),
        (foot + 48,),
        p,
    )


@case
def footer_virtual_size_absurd(d: Path) -> tuple[Path, Expect]:
    p = d / "dyn.vhd"
    layout = dynamic_disk(p)
    pyvhd.set_footer_field(p, "current_size", 2**63 + 512)
    return p, Expect(
        "VhdFormatError",
        ("invalid_field", "unsupported"),
        ("footer.current_size", "header.max_table_entries"),
        (layout.footer_offset + 48, HEADER_AT + 28),
        p,
    )


# -- header ----------------------------------------------------------------------------------------------------


@case
def header_bad_cookie(d: Path) -> tuple[Path, Expect]:
    p = d / "dyn.vhd"
    dynamic_disk(p)
    pyvhd.set_header_field(p, "cookie", b"cxsparsE")
    return p, Expect("VhdFormatError", ("bad_cookie",), ("header.cookie",), (HEADER_AT,), p)


@case
def header_bad_checksum(d: Path) -> tuple[Path, Expect]:
    p = d / "dyn.vhd"
    dynamic_disk(p)
    pyvhd.set_header_field(p, "checksum", 1, fix_checksum=False)
    return p, Expect("ChecksumError", ("checksum",), ("header.checksum",), (HEADER_AT + 36,), p)


@case
def header_field_changed_without_checksum(d: Path) -> tuple[Path, Expect]:
    p = d / "dyn.vhd"
    dynamic_disk(p)
    pyvhd.set_header_field(p, "block_size", 1 * MiB, fix_checksum=False)
    return p, Expect("ChecksumError", ("checksum",), ("header.checksum",), (HEADER_AT + 36,), p)


def _block_size_case(value: int) -> Case:
    def make(d: Path) -> tuple[Path, Expect]:
        p = d / "dyn.vhd"
        dynamic_disk(p)
        pyvhd.set_header_field(p, "block_size", value)
        return p, Expect(
            "VhdFormatError", ("invalid_field", "unsupported"), ("header.block_size",), (HEADER_AT + 32,), p
        )

    make.__name__ = f"block_size_{value}"
    return make


for _value in (3 * MiB, 3 * MiB // 2, 1000, 0, 2**31 + 2**30):
    case(_block_size_case(_value))


@case
def max_table_entries_huge(d: Path) -> tuple[Path, Expect]:
    p = d / "dyn.vhd"
    dynamic_disk(p)
    pyvhd.set_header_field(p, "max_table_entries", 0xFFFFFFFF)
    return p, Expect(
        "VhdFormatError",
        ("invalid_field", "unsupported", "truncated"),
        ("header.max_table_entries",),
        (HEADER_AT + 28,),
        p,
    )


@case
def max_table_entries_too_few(d: Path) -> tuple[Path, Expect]:
    p = d / "dyn.vhd"
    dynamic_disk(p)  # 8 MiB / 2 MiB = 4 entries needed
    pyvhd.set_header_field(p, "max_table_entries", 2)
    return p, Expect("VhdFormatError", ("invalid_field",), ("header.max_table_entries",), (HEADER_AT + 28,), p)


@case
def table_past_eof(d: Path) -> tuple[Path, Expect]:
    p = d / "dyn.vhd"
    dynamic_disk(p)
    pyvhd.set_header_field(p, "table_offset", 2**62)
    return p, Expect("VhdFormatError", ("truncated", "invalid_field"), ("header.table_offset",), (HEADER_AT + 16,), p)


@case
def table_offset_overflows(d: Path) -> tuple[Path, Expect]:
    p = d / "dyn.vhd"
    dynamic_disk(p)
    pyvhd.set_header_field(p, "table_offset", 2**64 - 8)
    return p, Expect("VhdFormatError", ("truncated", "invalid_field"), ("header.table_offset",), (HEADER_AT + 16,), p)


@case
def header_offset_past_eof(d: Path) -> tuple[Path, Expect]:
    p = d / "dyn.vhd"
    layout = dynamic_disk(p)
    pyvhd.set_footer_field(p, "data_offset", 2**50)
    return p, Expect(
        "VhdFormatError", ("truncated", "invalid_field"), ("footer.data_offset",), (layout.footer_offset + 16,), p
    )


# -- truncation ------------------------------------------------------------------------------------------------


@case
def empty_file(d: Path) -> tuple[Path, Expect]:
    p = d / "empty.vhd"
    p.write_bytes(b"")
    return p, Expect("TruncatedError", ("truncated",), ("footer",), (0,), p)


@case
def hundred_byte_file(d: Path) -> tuple[Path, Expect]:
    p = d / "tiny.vhd"
    p.write_bytes(pyvhd.build_fixed(MiB)[-100:])
    return p, Expect("TruncatedError", ("truncated",), ("footer",), (0,), p)


@case
def cut_mid_header_footer_kept(d: Path) -> tuple[Path, Expect]:
    """A copy that stopped inside the dynamic header but still got its footer."""
    p = d / "dyn.vhd"
    dynamic_disk(p)
    data = p.read_bytes()
    cut = HEADER_AT + 500
    p.write_bytes(data[:cut] + data[-SECTOR:])
    return p, Expect("TruncatedError", ("truncated",), ("footer.data_offset",), (cut + 16,), p)


@case
def cut_mid_bat_footer_kept(d: Path) -> tuple[Path, Expect]:
    p = d / "big.vhd"
    layout = dynamic_disk(p, size=4 * GiB, blocks=(0,))  # 2048 entries: an 8 KiB BAT
    data = p.read_bytes()
    cut = layout.table_offset + 3000
    p.write_bytes(data[:cut] + data[-SECTOR:])
    return p, Expect("TruncatedError", ("truncated",), ("header.table_offset",), (HEADER_AT + 16,), p)


@case
def fixed_shorter_than_its_size(d: Path) -> tuple[Path, Expect]:
    p = d / "fixed.vhd"
    fixed_disk(p, 2 * MiB)
    data = p.read_bytes()
    p.write_bytes(data[:MiB] + data[-SECTOR:])
    return p, Expect("TruncatedError", ("truncated",), ("footer.current_size",), (MiB + 48,), p)


def _pure_cut_case(name: str, where: Callable[[pyvhd.Layout], int]) -> Case:
    """A file simply cut short (its footer lost): any format error that names a field and an offset will do, as a
    reader cannot tell a cut file from a foreign one without guessing."""

    def make(d: Path) -> tuple[Path, Expect]:
        p = d / "cut.vhd"
        layout = dynamic_disk(p, size=4 * GiB, blocks=(0, 1))
        cut = where(layout)
        pyvhd.truncate(p, cut)
        return p, Expect("VhdFormatError", ("truncated", "bad_cookie"), ("*",), ("*",), p)

    make.__name__ = name
    return make


case(_pure_cut_case("cut_mid_header", lambda lay: HEADER_AT + 700))
case(_pure_cut_case("cut_mid_bat", lambda lay: lay.table_offset + 1000))
case(_pure_cut_case("cut_mid_block", lambda lay: lay.block_offsets[1] + 5000))


# -- BAT -------------------------------------------------------------------------------------------------------


@case
def bat_entry_past_eof(d: Path) -> tuple[Path, Expect]:
    p = d / "dyn.vhd"
    layout = dynamic_disk(p)
    off = pyvhd.set_bat_entry(p, 2, 0x00FFFFF0)
    assert off == layout.table_offset + 8
    return p, Expect("BatError", ("bat_out_of_range",), ("bat[2]",), (off,), p)


@case
def bat_entry_block_runs_into_footer(d: Path) -> tuple[Path, Expect]:
    p = d / "dyn.vhd"
    layout = dynamic_disk(p, blocks=(0, 2), gap_sectors=2 * MiB // SECTOR)
    # The block would start inside the file (in the unused space after the last block) but end past the footer.
    off = pyvhd.set_bat_entry(p, 3, (layout.footer_offset - 1024 * KiB) // SECTOR)
    return p, Expect("BatError", ("bat_out_of_range",), ("bat[3]",), (off,), p)


@case
def bat_entry_past_eof_in_a_parent(d: Path) -> tuple[Path, Expect]:
    parent = d / "parent.vhd"
    layout = dynamic_disk(parent)
    child = d / "child.vhd"
    child_of(child, parent)
    off = pyvhd.set_bat_entry(parent, 0, 0x7FFFFFFF)
    assert off == layout.table_offset
    return child, Expect("BatError", ("bat_out_of_range",), ("bat[0]",), (off,), parent)


@case
def overlapping_blocks_same_start(d: Path) -> tuple[Path, Expect]:
    p = d / "dyn.vhd"
    layout = dynamic_disk(p)
    bat = pyvhd.get_bat(p)
    pyvhd.set_bat_entry(p, 3, bat[2])
    t = layout.table_offset
    return p, Expect("BatError", ("overlapping_blocks",), ("bat[2]", "bat[3]"), (t + 8, t + 12), p)


@case
def overlapping_blocks_shifted(d: Path) -> tuple[Path, Expect]:
    p = d / "dyn.vhd"
    layout = dynamic_disk(p)
    bat = pyvhd.get_bat(p)
    pyvhd.set_bat_entry(p, 0, bat[2] + 1)  # starts one sector into block 2's span
    t = layout.table_offset
    return p, Expect("BatError", ("overlapping_blocks",), ("bat[0]", "bat[2]"), (t, t + 8), p)


@case
def block_over_the_header(d: Path) -> tuple[Path, Expect]:
    p = d / "dyn.vhd"
    layout = dynamic_disk(p)
    pyvhd.set_bat_entry(p, 3, HEADER_AT // SECTOR)
    t = layout.table_offset  # block 3 now also covers block 0: either may be named
    return p, Expect("BatError", ("overlapping_blocks",), ("bat[3]", "bat[0]"), (t + 12, t), p)


@case
def block_over_the_bat(d: Path) -> tuple[Path, Expect]:
    p = d / "dyn.vhd"
    layout = dynamic_disk(p)
    pyvhd.set_bat_entry(p, 0, layout.table_offset // SECTOR)
    return p, Expect("BatError", ("overlapping_blocks",), ("bat[0]",), (layout.table_offset,), p)


# -- chains ----------------------------------------------------------------------------------------------------


@case
def missing_parent(d: Path) -> tuple[Path, Expect]:
    parent = d / "parent.vhd"
    dynamic_disk(parent)
    child = d / "child.vhd"
    child_of(child, parent)
    parent.unlink()
    return child, Expect(
        "MissingParentError",
        ("missing_parent",),
        ("header.parent_name", "header.parent_locator", "header.parent_locator[0]", "header.parent_uuid"),
        (HEADER_AT + 64, HEADER_AT + 576, HEADER_AT + 40),
        child,
    )


@case
def parent_uuid_mismatch(d: Path) -> tuple[Path, Expect]:
    parent = d / "parent.vhd"
    dynamic_disk(parent)
    child = d / "child.vhd"
    child_of(child, parent)
    parent.unlink()
    dynamic_disk(parent)  # same name, another disk (new uuid)
    return child, Expect("ParentMismatchError", ("parent_mismatch",), ("header.parent_uuid",), (HEADER_AT + 40,), child)


def _locator_case(name: str, field_name: str, value: int) -> Case:
    """A child whose only way to its parent is locator 0, whose entry is broken: no unbounded read, a typed error."""

    def make(d: Path) -> tuple[Path, Expect]:
        parent = d / "parent.vhd"
        dynamic_disk(parent)
        child = d / "child.vhd"
        spec = pyvhd.ParentSpec.of(parent, name="", locators=[pyvhd.w2ku("parent.vhd")])
        data, _ = pyvhd.build_dynamic(pyvhd.DynamicSpec(virtual_size=8 * MiB, parent=spec))
        child.write_bytes(data)
        entry = pyvhd.set_locator_field(child, 0, field_name, value)
        offsets = (entry, entry + pyvhd.LOCATOR_FIELDS[field_name][0], None)
        fields = (
            "header.parent_locator[0]",
            f"header.parent_locator[0].platform_{field_name}",
            "header.parent_locator",
        )
        return child, Expect("VhdError", ("invalid_field", "truncated", "missing_parent"), fields, offsets, child)

    make.__name__ = name
    return make


case(_locator_case("locator_data_length_huge", "data_length", 0xFFFFFFFF))
case(_locator_case("locator_data_past_eof", "data_offset", 2**60))


def _cycle_files(d: Path, names: list[str]) -> Path:
    """Differencing disks each naming the next as its parent, the last naming the first."""
    uuids = [bytes([i + 1]) * 16 for i in range(len(names))]
    for i, name in enumerate(names):
        j = (i + 1) % len(names)
        parent = pyvhd.ParentSpec(uuid=uuids[j], timestamp=1, name=names[j], locators=[pyvhd.w2ku(names[j])])
        spec = pyvhd.DynamicSpec(virtual_size=MiB, parent=parent, uuid=uuids[i], timestamp=1)
        (d / name).write_bytes(pyvhd.build_dynamic(spec)[0])
    return d / names[0]


@case
def parent_cycle_of_two(d: Path) -> tuple[Path, Expect]:
    leaf = _cycle_files(d, ["a.vhd", "b.vhd"])
    return leaf, Expect("ChainCycleError", ("chain_cycle",), ("header.parent_uuid",), (HEADER_AT + 40, None))


@case
def parent_cycle_of_three(d: Path) -> tuple[Path, Expect]:
    leaf = _cycle_files(d, ["a.vhd", "b.vhd", "c.vhd"])
    return leaf, Expect("ChainCycleError", ("chain_cycle",), ("header.parent_uuid",), (HEADER_AT + 40, None))


@case
def own_parent(d: Path) -> tuple[Path, Expect]:
    leaf = _cycle_files(d, ["self.vhd"])
    return leaf, Expect("ChainCycleError", ("chain_cycle",), ("header.parent_uuid",), (HEADER_AT + 40, None), leaf)


def build_linear_chain(d: Path, depth: int) -> Path:
    """`depth` layers: a 1 MiB dynamic base and depth-1 empty differencing children (named l00 ... lNN)."""
    base = d / "l00.vhd"
    base.write_bytes(pyvhd.build_dynamic(pyvhd.DynamicSpec(virtual_size=MiB, block_size=512 * KiB))[0])
    leaf = base
    for i in range(1, depth):
        child = d / f"l{i:02d}.vhd"
        spec = pyvhd.DynamicSpec(virtual_size=MiB, block_size=512 * KiB, parent=pyvhd.ParentSpec.of(leaf))
        if i % 3 == 0:
            spec.sectors = {i: bytes([i]) * SECTOR}
        child.write_bytes(pyvhd.build_dynamic(spec)[0])
        leaf = child
    return leaf


@case
def chain_depth_31(d: Path) -> tuple[Path, Expect]:
    leaf = build_linear_chain(d, 31)
    return leaf, Expect("ChainTooDeepError", ("chain_too_deep",), ("header.parent_uuid",), (HEADER_AT + 40, None))


# -- the tests -------------------------------------------------------------------------------------------------


def assert_names_the_problem(outcome: Outcome, expect: Expect, case_name: str) -> None:
    assert not outcome.ok, f"{case_name}: expected {expect.cls}, but vhdcore accepted the input: {outcome.describe()}"
    assert outcome.exc_class != "PanicException", f"{case_name}: vhdcore panicked: {outcome.describe()}"
    assert "VhdError" in outcome.mro, f"{case_name}: not a VhdError: {outcome.describe()}"
    assert expect.cls in outcome.mro, f"{case_name}: expected {expect.cls}, got {outcome.describe()}"
    assert outcome.kind in expect.kinds, f"{case_name}: expected kind in {expect.kinds}, got {outcome.describe()}"
    if expect.fields == ("*",):
        assert outcome.field, f"{case_name}: the error names no field: {outcome.describe()}"
    else:
        assert outcome.field in expect.fields, f"{case_name}: expected field in {expect.fields}: {outcome.describe()}"
    if expect.offsets == ("*",):
        assert outcome.offset is not None, f"{case_name}: the error names no offset: {outcome.describe()}"
    else:
        assert outcome.offset in expect.offsets, (
            f"{case_name}: expected offset in {expect.offsets}: {outcome.describe()}"
        )
    if expect.path is not None:
        assert outcome.path is not None and Path(outcome.path).resolve() == expect.path.resolve(), (
            f"{case_name}: expected the error to name {expect.path.name}: {outcome.describe()}"
        )
    assert "\n" not in outcome.message.strip(), f"{case_name}: the message is not one line: {outcome.message!r}"
    if expect.path is not None:
        assert expect.path.name in outcome.message, f"{case_name}: the message does not name the file"


@pytest.mark.parametrize("name", sorted(CASES))
def test_malformed_input_gives_a_typed_error(tmp_path: Path, name: str) -> None:
    leaf, expect = CASES[name](tmp_path)
    out = str(tmp_path / "flat.raw")
    outcome = run_isolated("export", str(leaf), out=out)
    assert_names_the_problem(outcome, expect, name)


@pytest.mark.parametrize("name", sorted(CASES))
def test_check_reports_the_same_problem(tmp_path: Path, name: str) -> None:
    leaf, expect = CASES[name](tmp_path)
    outcome = run_isolated("check", str(leaf))
    assert outcome.ok, f"{name}: check must return problems, not raise: {outcome.describe()}"
    problems = outcome.result["problems"]
    assert problems, f"{name}: check found no problem"
    for p in problems:
        assert p["message"] and "\n" not in p["message"].strip()
    kinds = {p["kind"] for p in problems}
    assert kinds & set(expect.kinds), f"{name}: expected a problem of kind {expect.kinds}, got {problems}"
    if expect.fields != ("*",):
        assert {p["field"] for p in problems} & set(expect.fields), f"{name}: no problem names {expect.fields}"


def test_in_process_exceptions_carry_their_attributes(tmp_path: Path) -> None:
    """The same error raised in this process: a real exception object with kind, path, field and offset."""
    p = tmp_path / "dyn.vhd"
    dynamic_disk(p)
    pyvhd.set_header_field(p, "checksum", 1, fix_checksum=False)
    with pytest.raises(vhdcore.ChecksumError) as info:
        vhdcore.open_chain(str(p))
    err = info.value
    assert isinstance(err, vhdcore.VhdFormatError) and isinstance(err, vhdcore.VhdError)
    assert (err.kind, err.field, err.offset) == ("checksum", "header.checksum", HEADER_AT + 36)
    assert err.path is not None and Path(err.path).name == "dyn.vhd"
    assert "header.checksum" in str(err)


def test_exception_hierarchy() -> None:
    assert issubclass(vhdcore.ChecksumError, vhdcore.VhdFormatError)
    assert issubclass(vhdcore.TruncatedError, vhdcore.VhdFormatError)
    assert issubclass(vhdcore.BatError, vhdcore.VhdFormatError)
    assert issubclass(vhdcore.UnsupportedError, vhdcore.VhdFormatError)
    for cls in (
        vhdcore.MissingParentError,
        vhdcore.ParentMismatchError,
        vhdcore.ChainCycleError,
        vhdcore.ChainTooDeepError,
    ):
        assert issubclass(cls, vhdcore.ChainError)
    for root in (vhdcore.VhdIoError, vhdcore.VhdFormatError, vhdcore.ChainError, vhdcore.InvalidArgumentError):
        assert issubclass(root, vhdcore.VhdError)
    assert issubclass(vhdcore.VhdError, Exception)


def test_missing_file_is_an_io_error(tmp_path: Path) -> None:
    with pytest.raises(vhdcore.VhdIoError) as info:
        vhdcore.open_chain(str(tmp_path / "nope.vhd"))
    assert info.value.kind == "io"


# -- depth caps --------------------------------------------------------------------------------------------------


def test_depth_cap_default(tmp_path: Path) -> None:
    assert vhdcore.MAX_CHAIN_DEPTH == 30
    d30 = tmp_path / "d30"
    d30.mkdir()
    leaf30 = build_linear_chain(d30, 30)
    chain = vhdcore.open_chain(str(leaf30))
    assert chain.depth == 30
    assert chain.read(0, MiB) == pyvhd.flatten(leaf30)
    d31 = tmp_path / "d31"
    d31.mkdir()
    leaf31 = build_linear_chain(d31, 31)
    with pytest.raises(vhdcore.ChainTooDeepError) as info:
        vhdcore.open_chain(str(leaf31))
    assert info.value.kind == "chain_too_deep"
    # A caller may allow more.
    assert vhdcore.open_chain(str(leaf31), max_depth=31).depth == 31


def test_depth_cap_parameter(tmp_path: Path) -> None:
    leaf = build_linear_chain(tmp_path, 6)
    assert vhdcore.open_chain(str(leaf), max_depth=6).depth == 6
    with pytest.raises(vhdcore.ChainTooDeepError):
        vhdcore.open_chain(str(leaf), max_depth=5)
    problems = vhdcore.check(str(leaf), max_depth=5)
    assert any(p.kind == "chain_too_deep" for p in problems), problems
    assert vhdcore.check(str(leaf), max_depth=6) == []


# -- check lists every problem -------------------------------------------------------------------------------------


def test_check_lists_every_problem(tmp_path: Path) -> None:
    p = tmp_path / "many.vhd"
    layout = dynamic_disk(p, size=16 * MiB, blocks=(0, 1, 2, 5, 7))
    bat = pyvhd.get_bat(p)
    pyvhd.set_bat_entry(p, 1, 0x00FFFFF0)  # past the end
    pyvhd.set_bat_entry(p, 5, 0x0FFFFFF0)  # past the end
    pyvhd.set_bat_entry(p, 7, bat[2])  # overlaps block 2
    problems = vhdcore.check(str(p))
    found = {(x.kind, x.field, x.offset) for x in problems}
    t = layout.table_offset
    assert ("bat_out_of_range", "bat[1]", t + 4) in found, problems
    assert ("bat_out_of_range", "bat[5]", t + 20) in found, problems
    assert {("overlapping_blocks", "bat[7]", t + 28), ("overlapping_blocks", "bat[2]", t + 8)} & found, problems
    for x in problems:
        assert Path(x.path).name == "many.vhd"


def test_check_lists_problems_of_several_layers(tmp_path: Path) -> None:
    parent = tmp_path / "parent.vhd"
    dynamic_disk(parent)
    child = tmp_path / "child.vhd"
    child_layout = child_of(child, parent)
    pyvhd.set_header_field(parent, "checksum", 7, fix_checksum=False)
    pyvhd.set_bat_entry(child, 1, 0x00FFFFF0)
    problems = vhdcore.check(str(child))
    found = {(Path(x.path).name, x.kind, x.field) for x in problems}
    assert ("child.vhd", "bat_out_of_range", "bat[1]") in found, problems
    assert ("parent.vhd", "checksum", "header.checksum") in found, problems
    assert all(x.offset is not None for x in problems if x.kind in ("bat_out_of_range", "checksum"))
    assert child_layout.table_offset + 4 in {x.offset for x in problems}


def test_check_of_a_healthy_chain_is_empty(tmp_path: Path) -> None:
    base = tmp_path / "base.vhd"
    vhdcore.create(str(base), 3 * MiB)
    vhdcore.write(str(base), 0, b"x" * 5000)
    child = tmp_path / "child.vhd"
    vhdcore.snapshot(str(base), str(child))
    vhdcore.write(str(child), 100, b"y" * 5000)
    assert vhdcore.check(str(child)) == []


def test_bat_entries_are_read_big_endian(tmp_path: Path) -> None:
    """Sanity of the crafting helpers themselves (they feed every case above)."""
    p = tmp_path / "dyn.vhd"
    layout = dynamic_disk(p)
    raw = p.read_bytes()[layout.table_offset : layout.table_offset + 16]
    assert list(struct.unpack(">4I", raw)) == pyvhd.get_bat(p)
    assert pyvhd.get_bat(p)[1] == pyvhd.UNALLOCATED
