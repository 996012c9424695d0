"""`vhdcore.set_uuid`: a disk's new identity, read back by vhdcore and qemu-img; the content stays."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

import vhdcore

pytestmark = pytest.mark.native

MiB = 1024 * 1024


@pytest.mark.parametrize("disk_type", ["dynamic", "fixed"])
def test_set_uuid_gives_a_new_identity_and_keeps_the_content(tmp_path: Path, disk_type: str) -> None:
    disk = tmp_path / "d.vhd"
    old = vhdcore.create(str(disk), 4 * MiB, disk_type)  # type: ignore[arg-type]
    vhdcore.write(str(disk), MiB + 3, b"payload" * 1000)
    before = vhdcore.open_chain(str(disk)).read(0, 4 * MiB)

    new = vhdcore.set_uuid(str(disk))
    assert str(uuid.UUID(new)) == new != old.uuid
    assert vhdcore.open_chain(str(disk)).leaf.uuid == new
    chosen = str(uuid.uuid4())
    assert vhdcore.set_uuid(str(disk), chosen) == chosen
    chain = vhdcore.open_chain(str(disk))
    assert chain.leaf.uuid == chosen
    assert chain.read(0, 4 * MiB) == before
    assert vhdcore.check(str(disk)) == []


def test_set_uuid_refuses_what_is_not_a_uuid(tmp_path: Path) -> None:
    disk = tmp_path / "d.vhd"
    vhdcore.create(str(disk), MiB)
    data = disk.read_bytes()
    for bad in ("not-a-uuid", "00000000-0000-0000-0000-000000000000"):
        with pytest.raises(vhdcore.InvalidArgumentError):
            vhdcore.set_uuid(str(disk), bad)
    assert disk.read_bytes() == data
