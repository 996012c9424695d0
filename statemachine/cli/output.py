"""How the `imaging` commands print their results on stdout: one JSON document (`--json`), aligned `label: value`
fields, plain-text tables, and sizes for people. Errors, logs and progress go to stderr, never here."""

from __future__ import annotations

import json
from collections.abc import Sequence

import click

from statemachine.cli.common import KIB


def human_size(n: int) -> str:
    """A size for people: "10 GiB", "1.5 MiB", "512 B"."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < KIB or unit == "TiB":
            if unit == "B":
                return f"{n} B"
            text = f"{value:.2f}".rstrip("0").rstrip(".")
            return f"{text} {unit}"
        value /= KIB
    raise AssertionError("unreachable")


def size_with_bytes(n: int) -> str:
    """A size in human units followed by the exact number of bytes: "10 GiB (10737418240 bytes)"."""
    if n < KIB:
        return f"{n} bytes"
    return f"{human_size(n)} ({n} bytes)"


def print_json(value: object) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=False))


def print_fields(rows: Sequence[tuple[str, str]]) -> None:
    """Print `label: value` lines with the values aligned."""
    width = max((len(label) for label, _ in rows), default=0) + 1
    for label, value in rows:
        click.echo(f"{label + ':':<{width}} {value}")


def print_table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> None:
    """Print a plain-text table; columns listed in `right` are right-aligned (numbers)."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def line(cells: Sequence[str]) -> str:
        parts = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(cells)]
        return "  ".join(parts).rstrip()

    out = [line(headers)]
    out.extend(line(row) for row in rows)
    click.echo("\n".join(out))
