"""`Chain.export` into a pipe (stdout): written front to back, no seek, with the same bytes as the file exports
(raw: the flattened disk; vhd: a dynamic VHD whose blocks are those of the file export, only the footer's UUID and
timestamp differing)."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Literal

import pytest

import vhdcore
from tests.support.samples import Sample

pytestmark = pytest.mark.native


def export_through_pipe(chain: vhdcore.Chain, fmt: Literal["raw", "vhd"]) -> tuple[bytes, vhdcore.ExportStats]:
    """The bytes `chain.export` writes into a pipe (a thread drains it), and the returned stats."""
    read_end, write_end = os.pipe()
    received = bytearray()

    def drain() -> None:
        with os.fdopen(read_end, "rb") as pipe:
            while piece := pipe.read(1 << 20):
                received.extend(piece)

    reader = threading.Thread(target=drain)
    reader.start()
    try:
        seen: list[tuple[int, int]] = []
        stats = chain.export(f"/dev/fd/{write_end}", fmt, progress=lambda done, total: seen.append((done, total)))
    finally:
        os.close(write_end)
        reader.join()
    assert seen and seen[-1] == (chain.virtual_size, chain.virtual_size)
    assert [done for done, _ in seen] == sorted(done for done, _ in seen)
    return bytes(received), stats


def test_raw_and_vhd_into_a_pipe_are_the_file_exports(xo_chain3: Sample, tmp_path: Path) -> None:
    chain = vhdcore.open_chain(str(xo_chain3.leaf))
    raw, stats = export_through_pipe(chain, "raw")
    assert hashlib.sha256(raw).hexdigest() == xo_chain3.expected["sha256_raw"]
    assert stats.bytes_written == len(raw) == chain.virtual_size

    vhd, stats = export_through_pipe(chain, "vhd")
    assert stats.bytes_written == len(vhd)
    piped = tmp_path / "piped.vhd"
    piped.write_bytes(vhd)
    assert (
        hashlib.sha256(vhdcore.open_chain(str(piped)).read(0, chain.virtual_size)).hexdigest()
        == (xo_chain3.expected["sha256_raw"])
    )
    by_file = tmp_path / "file.vhd"
    file_stats = chain.export(str(by_file), "vhd")
    assert (file_stats.data_bytes, file_stats.bytes_written) == (stats.data_bytes, stats.bytes_written)
    assert by_file.read_bytes()[512:-512] == vhd[512:-512]
