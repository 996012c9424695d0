"""statemachine/imaging.asl.json: statelint passes, every Task is retried and caught, the substitutions are known."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ASL = Path(__file__).resolve().parents[2] / "statemachine" / "imaging.asl.json"
# The functions the workflow needs; infra/template.yaml and the embedded engine supply these ARNs.
EXPECTED_SUBSTITUTIONS = {
    "PrepareFunctionArn",
    "CoalesceFunctionArn",
    "SnapshotFunctionArn",
    "EstimateFunctionArn",
    "CompressFunctionArn",
    "UploadFunctionArn",
    "FinalizeFunctionArn",
    "FailFunctionArn",
}


def statelint(text: str, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "statelint", *extra, text], capture_output=True, text=True, timeout=60, check=False
    )


def substituted(text: str) -> str:
    return re.sub(r"\$\{(\w+)\}", lambda m: f"arn:aws:lambda:us-east-1:123456789012:function:{m.group(1)}", text)


def states_of(machine: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every state, nested Map processors included."""
    found: dict[str, dict[str, Any]] = {}
    for name, state in machine["States"].items():
        found[name] = state
        processor = state.get("ItemProcessor") or state.get("Iterator")
        if processor:
            found.update(states_of(processor))
    return found


def test_statelint_accepts_the_file_and_its_deployed_form() -> None:
    text = ASL.read_text()
    raw = statelint(str(ASL), "--ignore=URI")
    assert raw.returncode == 0, raw.stdout + raw.stderr
    deployed = statelint(substituted(text))
    assert deployed.returncode == 0, deployed.stdout + deployed.stderr


def test_substitutions_are_exactly_the_known_functions() -> None:
    assert set(re.findall(r"\$\{(\w+)\}", ASL.read_text())) == EXPECTED_SUBSTITUTIONS


def test_every_task_retries_transient_errors_and_fails_through_the_failure_path() -> None:
    machine = json.loads(ASL.read_text())
    top = machine["States"]
    for name, state in states_of(machine).items():
        if state["Type"] != "Task":
            continue
        retried = {error for rule in state.get("Retry", []) for error in rule["ErrorEquals"]}
        assert "TransientStorageError" in retried, name
        if name == "Failed" or name not in top:
            continue  # the failure path itself, and Map items (their Map catches)
        assert any(c["ErrorEquals"] == ["States.ALL"] and c["Next"] == "Failed" for c in state["Catch"]), name
    assert top["Compress"]["Catch"][0]["Next"] == "Failed"
    assert top["Failed"]["Next"] == "ImagingFailed" and top["ImagingFailed"]["Type"] == "Fail"


@pytest.mark.parametrize(
    ("breakage", "complaint"),
    [
        (lambda m: m["States"]["Snapshot"].update(Next="Nowhere"), "Nowhere"),
        (lambda m: m["States"]["Coalesced?"]["Choices"][0].update(Next="Snapshots"), "Snapshots"),
        (lambda m: m["States"]["Prepare"].update(Type="Taks"), "Taks"),
        (lambda m: m["States"].pop("Finalize"), "Finalize"),
    ],
)
def test_statelint_rejects_a_broken_copy(breakage: Any, complaint: str) -> None:
    machine = json.loads(ASL.read_text())
    breakage(machine)
    result = statelint(substituted(json.dumps(machine)))
    assert result.returncode != 0
    assert complaint in result.stdout + result.stderr
