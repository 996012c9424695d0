"""The README's API walkthrough ("The HTTP API and schedules"), run as written against a clean data directory.

The console block is read from README.md (never copied here): each `$ ` line, with its `\\` continuation lines, is
one command, and the commands run in order in one bash, as a user pasting them would, with `set -e`. The only
change is the port: 8080 becomes a free one, so the test never meets another server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

import pytest

from tests.conftest import REPO
from tests.support.moto_server import free_port

pytestmark = pytest.mark.functional

SECTION = "### The HTTP API and schedules"


def walkthrough_commands(readme: str) -> list[str]:
    """The commands of the first console block of SECTION: `$ ` lines joined with their continuation lines."""
    section = readme.split(SECTION, 1)[1]
    block = re.search(r"```console\n(.*?)```", section, re.DOTALL)
    assert block is not None, f"no console block under {SECTION!r}"
    commands: list[str] = []
    continued = False
    for line in block.group(1).splitlines():
        if continued:
            commands[-1] += "\n" + line
        else:
            assert line.startswith("$ "), f"not a command nor a continuation: {line!r}"
            commands.append(line[2:])
        continued = line.rstrip().endswith("\\")
    return commands


def test_the_block_is_parsed_into_commands() -> None:
    commands = walkthrough_commands((REPO / "README.md").read_text())
    assert commands[0].startswith("imaging ") and any(c.startswith("imaging serve") for c in commands)
    assert any("\\\n" in command for command in commands), "continuation lines are joined to their command"
    assert commands[-1].startswith("kill ")


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found: the README's walkthrough uses it"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def test_the_readme_api_walkthrough_works_as_written(imaging_exe: str, tmp_path: Path) -> None:
    _tool("curl")
    _tool("jq")
    port = free_port()
    commands = [
        command.replace("8080", str(port)) for command in walkthrough_commands((REPO / "README.md").read_text())
    ]
    script = "set -e\n" + "\n".join(commands) + "\nwait\n"
    data_dir = tmp_path / "data"
    env = {
        **os.environ,
        "IMAGING_DATA_DIR": str(data_dir),
        # `imaging` as a user has it: the installed console script of this environment.
        "PATH": f"{Path(imaging_exe).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    work = tmp_path / "work"
    work.mkdir()
    # Its own session: whatever the script leaves running (the server, if a line failed) is stopped with it.
    process = subprocess.Popen(
        ["bash", "-c", script],
        cwd=work,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        out, err = process.communicate(timeout=240)
    finally:
        if process.poll() is None or _group_alive(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    assert process.returncode == 0, f"stdout:\n{out}\nstderr:\n{err}"
    documents = json_documents(out)
    servers = next(doc for doc in documents if "servers" in doc)
    assert [server["id"] for server in servers["servers"]] == ["web1"]
    image = next(doc for doc in documents if "status" in doc and "id" in doc)
    assert image["status"] == "ACTIVE" and image["server_id"] == "web1", image
    assert image["compressed_size"] > 0 and image["progress"] == 100
    assert "started 0 scheduled image(s)" in out  # the new schedule owes nothing for past windows


def json_documents(text: str) -> list[dict[str, object]]:
    """The JSON objects in `text`, in order (curl prints no newline after a body: they may share a line)."""
    decoder = json.JSONDecoder()
    found = []
    index = text.find("{")
    while index != -1:
        document, end = decoder.raw_decode(text, index)
        found.append(document)
        index = text.find("{", end)
    return found


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True
