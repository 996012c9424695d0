"""Output and start-up discipline of the `imaging` command (DESIGN §6, issue 13): stdout carries the result only
(with `--json`, exactly one JSON document), logs and progress go to stderr (WARNING by default, INFO with `-v`,
JSON lines with `--log-format json`), and the commands that run no workflow import no AWS library nor the engine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

import vhdcore
from tests.support.cli import Run

REPO = Path(__file__).resolve().parents[2]
MIB = 1024**2
HEAVY = ("moto", "boto3", "botocore", "aws_lambda_powertools", "aws_xray_sdk", "s3transfer")
"""Top-level packages a command that runs no workflow must not import (nor the engine, nor the handlers)."""


def one_json(result: subprocess.CompletedProcess[str]) -> Any:
    """The one JSON document on stdout (json.loads fails on anything else beside it)."""
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


# --- start-up: what a command imports --------------------------------------------------------------------------------
def modules_after(argv: list[str], tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    """Run `imaging ARGV` in a fresh interpreter through click's main (not standalone: it returns), and the names
    of the modules loaded by then."""
    listing = tmp_path / "modules.json"
    code = (
        "import json, sys\n"
        "from statemachine.cli import imaging\n"
        f"imaging.main({argv!r}, prog_name='imaging', standalone_mode=False)\n"
        f"open({str(listing)!r}, 'w').write(json.dumps(sorted(sys.modules)))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "IMAGING_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return result, set(json.loads(listing.read_text()))


def heavy_modules(modules: set[str]) -> list[str]:
    return sorted(
        name
        for name in modules
        if name.split(".")[0] in HEAVY
        or name.startswith(("statemachine.engine", "statemachine.local", "functions.handlers"))
    )


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["vhd", "--help"], ["image", "--help"]])
def test_help_and_version_import_no_aws_library_nor_the_engine(argv: list[str], tmp_path: Path) -> None:
    _, modules = modules_after(argv, tmp_path)
    assert heavy_modules(modules) == []


def test_vhd_commands_import_no_aws_library_nor_the_engine_nor_rich(tmp_path: Path) -> None:
    disk = tmp_path / "d.vhd"
    vhdcore.create(str(disk), 8 * MIB)
    vhdcore.write(str(disk), MIB, b"some data " * 1000)
    for argv in (["vhd", "info", str(disk), "--json"], ["vhd", "map", str(disk), "--json"]):
        result, modules = modules_after(argv, tmp_path)
        json.loads(result.stdout)
        assert heavy_modules(modules) == [], argv
        assert not {name.split(".")[0] for name in modules} & {"rich", "pydantic"}, argv


def test_import_of_the_cli_loads_no_subcommand() -> None:
    code = (
        "import json, sys, statemachine.cli\n"
        "print(json.dumps([m for m in sys.modules if m.split('.')[0] in ('statemachine', 'functions')]))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}
    )
    assert result.returncode == 0, result.stderr
    assert set(json.loads(result.stdout)) == {
        "statemachine",
        "statemachine.cli",
        "statemachine.cli.common",
        "statemachine.cli.errors",
    }


def test_the_help_table_matches_the_commands() -> None:
    """`imaging --help` lists the groups from a static table (so as to import none): it must say what they say."""
    import importlib

    from statemachine.cli import COMMANDS

    for name, lazy in COMMANDS.items():
        command = getattr(importlib.import_module(lazy.module), lazy.attribute)
        assert command.name == name
        assert command.get_short_help_str(limit=1000) == lazy.short_help, name


# --- stdout: one JSON document for every --json command ---------------------------------------------------------------
def test_every_json_command_prints_one_document_and_nothing_else(cli: Run, leaf: Path) -> None:
    middle = leaf.with_name("middle.vhd")
    for args in (
        ["vhd", "info", leaf],
        ["vhd", "check", leaf],
        ["vhd", "map", leaf],
        ["vhd", "estimate", leaf],
    ):
        one_json(cli(*args, "--json"))
    differ = cli("vhd", "diff", middle, leaf, "--json")
    assert differ.returncode == 1, differ.stderr  # the chains differ (as `qemu-img compare`): still one document
    json.loads(differ.stdout)

    assert one_json(cli("server", "add", "web1", "--disk", leaf, "--json"))["id"] == "web1"
    assert one_json(cli("server", "add", "web1", "--disk", leaf, "--replace", "--json"))["id"] == "web1"
    assert [s["id"] for s in one_json(cli("server", "list", "--json"))] == ["web1"]
    assert one_json(cli("server", "show", "web1", "--json"))["lock"] is None
    token = one_json(cli("token", "create", "acme", "--json"))
    assert token["tenant"] == "acme"
    assert [t["id"] for t in one_json(cli("token", "list", "--json"))] == [token["id"]]
    assert one_json(cli("token", "revoke", token["id"], "--json")) == {"revoked": token["id"], "tenant": "acme"}
    assert one_json(cli("schedule", "set", "web1", "--daily", "03:00", "--json"))["server_id"] == "web1"
    shown = one_json(cli("schedule", "show", "--json"))
    assert [s["server_id"] for s in shown] == ["web1"] and shown[0]["next_run"].endswith("T03:00:00+00:00")
    assert one_json(cli("schedule", "run-due", "--json"))["failed_to_start"] == []
    assert one_json(cli("schedule", "delete", "web1", "--json")) == {"deleted": "web1"}
    assert one_json(cli("server", "remove", "web1", "--json"))["removed"] == "web1"

    created = cli("image", "create", "--disk", leaf, "--wait", "--json")
    record = one_json(created)
    assert record["status"] == "ACTIVE"
    assert record["object_url"].startswith("file://") and record["object_url"].endswith("image.vhd.zst")
    assert record["manifest"]["image_id"] == record["id"]
    assert "INFO" not in created.stderr  # the handlers log at WARNING unless -v

    assert [i["id"] for i in one_json(cli("image", "list", "--json"))] == [record["id"]]
    assert one_json(cli("image", "show", record["id"], "--json"))["job"]["status"] == "ACTIVE"
    assert one_json(cli("image", "verify", record["id"], "--json"))["ok"] is True
    assert one_json(cli("image", "delete", record["id"], "--json")) == {"deleted": record["id"]}


# --- logs and progress on stderr ----------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Path:
    disk = tmp_path / "disks" / "small.vhd"
    disk.parent.mkdir(parents=True)
    vhdcore.create(str(disk), 16 * MIB)
    vhdcore.write(str(disk), 3 * MIB, b"a little data " * 10_000)
    return disk


def test_info_logs_reach_stderr_with_v_and_never_stdout(cli: Run, small_disk: Path) -> None:
    result = cli("-v", "image", "create", "--disk", small_disk, "--progress", "jsonl", "--json")

    record = one_json(result)
    assert record["status"] == "ACTIVE"
    lines = result.stderr.splitlines()
    logs = [line for line in lines if not line.startswith("{")]
    assert any(" INFO imaging-prepare: job queued " in line for line in logs), result.stderr
    assert all(" INFO " in line or " WARNING " in line for line in logs if line[:4].isdigit()), result.stderr
    progress = [json.loads(line) for line in lines if line.startswith("{")]
    assert progress and progress[-1]["status"] == "ACTIVE" and progress[-1]["percent"] == 100
    assert {"job_id", "bytes_done", "bytes_total", "eta_seconds"} <= set(progress[-1])


def test_log_format_json_gives_json_lines_on_stderr(cli: Run, small_disk: Path) -> None:
    result = cli("-v", "--log-format", "json", "image", "create", "--disk", small_disk, "--json")

    assert one_json(result)["status"] == "ACTIVE"
    records = [json.loads(line) for line in result.stderr.splitlines()]  # every line is JSON
    assert any(r.get("level") == "INFO" and r.get("message") == "job queued" for r in records), result.stderr


def test_serve_writes_its_address_on_stdout_and_its_access_log_on_stderr(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO), "IMAGING_DATA_DIR": str(tmp_path / "data")}
    server = subprocess.Popen(
        [sys.executable, "-m", "statemachine.cli", "-v", "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    try:
        assert server.stdout is not None
        first = server.stdout.readline()
        assert first, server.stderr.read() if server.stderr else "serve exited"
        base = json.loads(first)["listening"]
        with urllib.request.urlopen(f"{base}/v1/openapi.json", timeout=30) as reply:
            assert reply.status == 200
    finally:
        server.terminate()
        out, err = server.communicate(timeout=30)
    assert out == ""  # nothing after the address line
    assert any("GET /v1/openapi.json" in line and " 200 " in line for line in err.splitlines()), err
