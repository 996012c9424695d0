"""Managing servers, tokens and schedules from the command line (issue 14, item 6), as an operator runs it: a child
process on its own data directory. `server add` never puts two servers on one chain nor silently replaces one;
`server remove` waits for imaging and keeps the images; a revoked token is refused by the API; `schedule show` says
when each schedule fires next."""

from __future__ import annotations

import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime, time, timedelta
from pathlib import Path
from typing import Any

import pytest

import vhdcore
from functions.catalog.schedules import WEEKDAYS
from functions.state import Image, Job, open_state_store
from tests.support.api_server import serving
from tests.support.cli import Run, assert_one_line_error, ok_json

MIB = 1024**2


@pytest.fixture
def disks(tmp_path: Path) -> dict[str, Path]:
    """web1's chain (base <- leaf), a child of web1's leaf, a disk of its own, and a symlink to web1's base."""
    folder = tmp_path / "disks"
    folder.mkdir()
    base, leaf, child, own = (folder / name for name in ("base.vhd", "leaf.vhd", "child.vhd", "own.vhd"))
    vhdcore.create(str(base), 8 * MIB)
    vhdcore.write(str(base), MIB, b"base data " * 1000)
    vhdcore.snapshot(str(base), str(leaf))
    vhdcore.write(str(leaf), 2 * MIB, b"leaf data " * 1000)
    vhdcore.snapshot(str(leaf), str(child))
    vhdcore.create(str(own), 8 * MIB)
    vhdcore.write(str(own), 0, b"a disk of its own " * 1000)
    alias = folder / "alias.vhd"
    alias.symlink_to(base)
    return {"base": base, "leaf": leaf, "child": child, "own": own, "alias": alias}


def state_of(tmp_path: Path) -> Any:
    return open_state_store(f"sqlite:///{tmp_path / 'data' / 'state.sqlite3'}")


# --- server add ----------------------------------------------------------------------------------------------------
def test_add_refuses_a_registered_name_unless_replace(cli: Run, disks: dict[str, Path]) -> None:
    ok_json(cli("server", "add", "web1", "--disk", disks["leaf"], "--json"))

    lines = assert_one_line_error(cli("server", "add", "web1", "--disk", disks["own"], "--json"))
    assert "server web1 is already registered" in lines[0]
    assert "--replace" in lines[1]
    assert ok_json(cli("server", "show", "web1", "--json"))["disk"] == str(disks["leaf"])  # unchanged

    replaced = ok_json(cli("server", "add", "web1", "--disk", disks["own"], "--replace", "--json"))
    assert replaced["disk"] == str(disks["own"])
    assert ok_json(cli("server", "show", "web1", "--json"))["disk"] == str(disks["own"])


def test_add_refuses_a_disk_whose_chain_shares_a_layer_with_another_server(
    cli: Run,
    disks: dict[str, Path],
    tmp_path: Path,
) -> None:
    ok_json(cli("server", "add", "web1", "--disk", disks["leaf"], "--json"))
    before = {name: path.read_bytes() for name, path in disks.items() if name != "alias"}

    # web1's own leaf, a layer of its chain, that layer through a symlink, and a chain built on web1's leaf.
    for name in ("leaf", "base", "alias", "child"):
        for replace in ([], ["--replace"]):
            result = cli("server", "add", "web2", "--disk", disks[name], *replace, "--json")
            lines = assert_one_line_error(result)
            assert "registered server web1's chain" in lines[0] and "refusing to register server web2" in lines[0]
            assert lines[1].startswith("hint: two servers on one chain")
            assert result.stdout == ""
    assert [s["id"] for s in ok_json(cli("server", "list", "--json"))] == ["web1"]

    # Another tenant's server counts too; a chain of its own is fine.
    assert (
        "web1's chain" in assert_one_line_error(cli("server", "add", "db", "--disk", disks["base"], "--tenant", "b"))[0]
    )
    ok_json(cli("server", "add", "web2", "--disk", disks["own"], "--json"))
    assert {name: path.read_bytes() for name, path in disks.items() if name != "alias"} == before


def store_chain(folder: Path) -> dict[str, Path]:
    """base <- leaf <- child, written in `folder` (whose files the tests lay out as store objects)."""
    folder.mkdir(parents=True)
    base, leaf, child = folder / "base.vhd", folder / "leaf.vhd", folder / "child.vhd"
    vhdcore.create(str(base), 8 * MIB)
    vhdcore.write(str(base), 0, b"kept in a store " * 1000)
    vhdcore.snapshot(str(base), str(leaf))
    vhdcore.snapshot(str(leaf), str(child))
    return {"base": base, "leaf": leaf, "child": child}


def test_layers_named_by_store_key_or_by_file_are_one_layer(cli: Run, tmp_path: Path) -> None:
    """Disks kept in the (file) store: a key and the file behind it name the same layer, whichever way round."""
    files = store_chain(tmp_path / "data" / "store" / "sr" / "s1")
    ok_json(cli("server", "add", "s1", "--disk", "sr/s1/leaf.vhd", "--json"))
    for disk in ("sr/s1/base.vhd", "sr/s1/child.vhd", files["base"]):
        assert "registered server s1's chain" in assert_one_line_error(cli("server", "add", "s2", "--disk", disk))[0]
    ok_json(cli("server", "add", "s1", "--disk", files["leaf"], "--replace", "--json"))  # the same chain, as a file
    assert (
        "registered server s1's chain"
        in assert_one_line_error(cli("server", "add", "s2", "--disk", "sr/s1/base.vhd"))[0]
    )
    assert [s["id"] for s in ok_json(cli("server", "list", "--json"))] == ["s1"]


def test_layers_in_s3_are_compared_by_key(aws_test_env: None, moto_endpoint: str, cli: Run, tmp_path: Path) -> None:
    import boto3

    bucket = f"disks-{uuid.uuid4().hex[:20]}"
    client = boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=bucket)
    for name, path in store_chain(tmp_path / "chain").items():
        client.upload_file(str(path), bucket, f"cloud/sr/s1/{name}.vhd")
    store = ["--store", f"s3://{bucket}/cloud", "--endpoint-url", moto_endpoint]

    ok_json(cli("server", "add", "s1", "--disk", "sr/s1/leaf.vhd", *store, "--json"))
    for disk in ("sr/s1/base.vhd", "sr/s1/child.vhd", f"s3://{bucket}/cloud/sr/s1/leaf.vhd"):
        lines = assert_one_line_error(cli("server", "add", "s2", "--disk", disk, *store))
        assert "is a layer of registered server s1's chain" in lines[0]
    ok_json(cli("server", "add", "s1", "--disk", "sr/s1/child.vhd", *store, "--replace", "--json"))


def test_replace_may_move_a_server_onto_a_child_of_its_own_chain(cli: Run, disks: dict[str, Path]) -> None:
    ok_json(cli("server", "add", "web1", "--disk", disks["leaf"], "--json"))
    moved = ok_json(cli("server", "add", "web1", "--disk", disks["child"], "--replace", "--json"))
    assert moved["disk"] == str(disks["child"])


def test_add_replace_and_remove_are_refused_while_the_server_is_being_imaged(
    cli: Run,
    disks: dict[str, Path],
    tmp_path: Path,
) -> None:
    ok_json(cli("server", "add", "web1", "--disk", disks["leaf"], "--json"))
    ok_json(cli("schedule", "set", "web1", "--daily", "03:00", "--json"))
    # A live job holds the server's lock (as `image create` does while it runs).
    state = state_of(tmp_path)
    now = datetime.now(UTC)
    state.put_image(
        Image(id="img-running", tenant="local", server_id="web1", job_id="job-running", name="n", created_at=now)
    )
    state.create_job(Job.queued(id="job-running", tenant="local", server_id="web1", image_id="img-running", at=now))
    assert state.acquire_lock("web1", "job-running", 600)

    for argv in (["server", "remove", "web1"], ["server", "add", "web1", "--disk", disks["own"], "--replace"]):
        lines = assert_one_line_error(cli(*argv, "--json"))
        assert "server web1 is being imaged (by job-running)" in lines[0]
        assert "img-running" in lines[1] and "imaging image cancel img-running" in lines[1]
    shown = ok_json(cli("server", "show", "web1", "--json"))
    assert shown["disk"] == str(disks["leaf"]) and shown["lock"]["owner"] == "job-running"
    assert ok_json(cli("schedule", "show", "web1", "--json"))[0]["server_id"] == "web1"

    # Once the job is over, the server goes (and the lock it took for that is released).
    assert state.release_lock("web1", "job-running")
    removed = ok_json(cli("server", "remove", "web1", "--json"))
    assert removed == {
        "removed": "web1",
        "tenant": "local",
        "disk": str(disks["leaf"]),
        "schedule_removed": True,
        "images_kept": ["img-running"],
    }
    assert state.get_lock("web1") is None
    state.close()


def test_a_job_whose_runner_died_does_not_keep_its_server(cli: Run, disks: dict[str, Path], tmp_path: Path) -> None:
    """A job silent for an hour (its process killed) holds the lock until it expires: remove fails it INTERRUPTED
    and proceeds."""
    ok_json(cli("server", "add", "web1", "--disk", disks["leaf"], "--json"))
    state = state_of(tmp_path)
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    state.put_image(
        Image(id="img-dead", tenant="local", server_id="web1", job_id="job-dead", name="n", created_at=long_ago)
    )
    state.create_job(Job.queued(id="job-dead", tenant="local", server_id="web1", image_id="img-dead", at=long_ago))
    assert state.acquire_lock("web1", "job-dead", 6 * 3600)

    removed = ok_json(cli("server", "remove", "web1", "--json"))
    assert removed["removed"] == "web1" and removed["images_kept"] == ["img-dead"]
    failed = state.get_job("job-dead")
    assert (failed.status.value, failed.error_code) == ("ERROR", "INTERRUPTED")
    assert state.get_lock("web1") is None
    state.close()


# --- server remove -------------------------------------------------------------------------------------------------
def test_remove_keeps_the_images_listable_and_exportable_and_the_disk_in_place(
    cli: Run,
    disks: dict[str, Path],
    tmp_path: Path,
) -> None:
    ok_json(cli("server", "add", "web1", "--disk", disks["own"], "--json"))
    made = ok_json(cli("image", "create", "web1", "--wait", "--json"))
    assert made["status"] == "ACTIVE"
    disk_now = ok_json(cli("server", "show", "web1", "--json"))["disk"]
    ok_json(cli("schedule", "set", "web1", "--weekly", "friday", "22:15", "--json"))

    text = cli("server", "remove", "web1")
    assert text.returncode == 0, text.stderr
    assert "removed server web1" in text.stdout and "schedule deleted" in text.stdout
    assert disk_now in text.stdout and "1 image(s) kept" in text.stdout

    assert "not found" in assert_one_line_error(cli("server", "show", "web1"))[0]
    assert ok_json(cli("server", "list", "--json")) == []
    assert ok_json(cli("schedule", "show", "--json")) == []
    assert [i["id"] for i in ok_json(cli("image", "list", "--server", "web1", "--json"))] == [made["id"]]
    assert [i["id"] for i in ok_json(cli("image", "list", "--json"))] == [made["id"]]
    assert ok_json(cli("image", "verify", made["id"], "--json"))["ok"] is True
    raw = tmp_path / "web1.raw"
    assert cli("image", "export", made["id"], raw, "--format", "raw").returncode == 0
    assert raw.read_bytes()[: len(b"a disk of its own ")] == b"a disk of its own "
    assert Path(disk_now).is_file() and disks["own"].is_file()

    # The name is free again, and an image of the new server is not mixed up with the kept one.
    lines = assert_one_line_error(cli("server", "remove", "web1", "--json"))
    assert "server 'web1' not found" in lines[0]


# --- tokens --------------------------------------------------------------------------------------------------------
def http_status(url: str, token: str) -> int:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as error:
        return int(error.code)


def test_tokens_are_listed_without_secrets_and_a_revoked_one_gets_401(
    cli: Run,
    disks: dict[str, Path],
    tmp_path: Path,
) -> None:
    created = {tenant: ok_json(cli("token", "create", tenant, "--json")) for tenant in ("acme", "beta")}
    extra = ok_json(cli("token", "create", "acme", "--json"))
    assert all(c["id"].startswith("tok-") for c in (*created.values(), extra))
    ok_json(cli("server", "add", "web1", "--disk", disks["own"], "--tenant", "acme", "--json"))

    listed = cli("token", "list", "--json")
    everyone = ok_json(listed)
    assert [t["id"] for t in everyone] == [created["acme"]["id"], created["beta"]["id"], extra["id"]]
    assert {t["tenant"] for t in everyone} == {"acme", "beta"}
    assert all(set(t) == {"id", "tenant", "created_at", "last_used_at"} for t in everyone)
    database = (tmp_path / "data" / "state.sqlite3").read_bytes()
    for secret in (created["acme"]["token"], created["beta"]["token"], extra["token"]):
        assert secret not in listed.stdout and secret.encode() not in database
    assert [t["id"] for t in ok_json(cli("token", "list", "--tenant", "beta", "--json"))] == [created["beta"]["id"]]
    table = cli("token", "list", "--tenant", "acme")
    assert table.returncode == 0 and table.stdout.splitlines()[0].split() == ["ID", "TENANT", "CREATED", "LAST", "USED"]
    assert created["acme"]["id"] in table.stdout and "never" in table.stdout

    with serving(tmp_path / "data") as served:
        images = f"{served.url}/v1/servers/web1/images"
        assert http_status(images, created["acme"]["token"]) == 200
        assert http_status(images, extra["token"]) == 200
        revoked = ok_json(cli("token", "revoke", created["acme"]["id"], "--json"))
        assert revoked == {"revoked": created["acme"]["id"], "tenant": "acme"}
        assert http_status(images, created["acme"]["token"]) == 401
        assert http_status(images, extra["token"]) == 200  # the tenant's other token still works

    after = {t["id"]: t for t in ok_json(cli("token", "list", "--json"))}
    assert set(after) == {created["beta"]["id"], extra["id"]}
    assert after[extra["id"]]["last_used_at"] is not None and after[created["beta"]["id"]]["last_used_at"] is None

    for bad in (created["acme"]["id"], "tok-nope", "../x"):
        lines = assert_one_line_error(cli("token", "revoke", bad, "--json"))
        assert "no token" in lines[0] and "imaging token list" in lines[1]
    assert "invalid tenant id" in assert_one_line_error(cli("token", "list", "--tenant", "a/b"))[0]


# --- schedules -----------------------------------------------------------------------------------------------------
def expected_next_run(now: datetime, at: time, weekday: int | None) -> datetime:
    """The next firing after `now`, found by walking day by day (independent of the implementation)."""
    day = now.replace(hour=at.hour, minute=at.minute, second=0, microsecond=0) - timedelta(days=1)
    while day <= now or (weekday is not None and day.weekday() != weekday):
        day += timedelta(days=1)
    return day


def test_schedule_show_gives_the_next_run_and_delete_stops_the_schedule(cli: Run, disks: dict[str, Path]) -> None:
    ok_json(cli("server", "add", "web1", "--disk", disks["leaf"], "--json"))
    ok_json(cli("server", "add", "web2", "--disk", disks["own"], "--json"))
    # Times at least two hours away from now, so that the minute turning during the test changes nothing.
    soon = (datetime.now(UTC) + timedelta(hours=2)).time().replace(second=0, microsecond=0)
    passed = (datetime.now(UTC) - timedelta(hours=2)).time().replace(second=0, microsecond=0)
    today = datetime.now(UTC).weekday()
    ok_json(cli("schedule", "set", "web1", "--daily", f"{soon:%H:%M}", "--json"))
    ok_json(cli("schedule", "set", "web2", "--weekly", WEEKDAYS[today], f"{passed:%H:%M}", "--json"))

    before = datetime.now(UTC)
    shown = {s["server_id"]: s for s in ok_json(cli("schedule", "show", "--json"))}
    after = datetime.now(UTC)
    for server, at, weekday in (("web1", soon, None), ("web2", passed, today)):
        next_run = datetime.fromisoformat(shown[server]["next_run"])
        assert next_run.utcoffset() == timedelta(0)
        assert next_run in {expected_next_run(before, at, weekday), expected_next_run(after, at, weekday)}
        assert shown[server]["due"] is False  # the schedules are younger than their last window
    assert datetime.fromisoformat(shown["web2"]["next_run"]) - before > timedelta(days=6)  # next week, same day

    text = cli("schedule", "show", "web2")
    assert text.returncode == 0 and f"next run {shown['web2']['next_run']}" in text.stdout

    assert ok_json(cli("schedule", "delete", "web1", "--json")) == {"deleted": "web1"}
    assert [s["server_id"] for s in ok_json(cli("schedule", "show", "--json"))] == ["web2"]
    lines = assert_one_line_error(cli("schedule", "delete", "web1", "--json"))
    assert "server 'web1' has no schedule" in lines[0] and lines[1].startswith("hint: ")
    assert "invalid server id" in assert_one_line_error(cli("schedule", "delete", "../x"))[0]
    plain = cli("schedule", "delete", "web2")
    assert plain.returncode == 0 and "no longer imaged on a schedule" in plain.stdout
    assert ok_json(cli("server", "show", "web2", "--json"))["id"] == "web2"  # the server stays
