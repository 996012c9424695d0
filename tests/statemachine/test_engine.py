"""The embedded engine runs real ASL on moto's interpreter and calls Python handlers in this process."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from statemachine.engine import EngineError, LocalEngine, substitute

REPO = Path(__file__).resolve().parents[2]


class TransientFaultError(Exception):
    """Stands for a retryable storage error."""


class PermanentFaultError(Exception):
    """Stands for a corrupt disk: not retried."""


@pytest.fixture(scope="module")
def engine() -> Any:
    with LocalEngine() as running:
        yield running


def asl(states: dict[str, Any], start: str) -> str:
    return json.dumps({"StartAt": start, "States": states})


def test_tasks_map_and_choice_loop_run_in_order(engine: LocalEngine) -> None:
    seen: list[str] = []
    lock = threading.Lock()

    def prepare(event: dict[str, Any], context: Any) -> dict[str, Any]:
        seen.append(f"prepare:{context.function_name}")
        return {"items": [{"n": n} for n in range(event["count"])], "rounds": 0}

    def square(event: dict[str, Any], context: Any) -> int:
        with lock:
            seen.append("square")
        return int(event["n"]) ** 2

    def step(event: dict[str, Any], context: Any) -> dict[str, Any]:
        return {"rounds": event["rounds"] + 1, "done": event["rounds"] + 1 >= 3}

    arns = {
        "PrepareArn": engine.register_function("t1-prepare", prepare),
        "SquareArn": engine.register_function("t1-square", square),
        "StepArn": engine.register_function("t1-step", step),
    }
    definition = asl(
        {
            "Prepare": {"Type": "Task", "Resource": "${PrepareArn}", "Next": "Squares"},
            "Squares": {
                "Type": "Map",
                "ItemsPath": "$.items",
                "MaxConcurrency": 4,
                "ItemProcessor": {
                    "ProcessorConfig": {"Mode": "INLINE"},
                    "StartAt": "Square",
                    "States": {"Square": {"Type": "Task", "Resource": "${SquareArn}", "End": True}},
                },
                "ResultPath": "$.squares",
                "Next": "Step",
            },
            "Step": {
                "Type": "Task",
                "Resource": "${StepArn}",
                "Parameters": {"rounds.$": "$.rounds"},
                "ResultSelector": {"rounds.$": "$.rounds", "done.$": "$.done"},
                "ResultPath": "$.loop",
                "Next": "Again?",
            },
            "Again?": {
                "Type": "Choice",
                "Choices": [{"Variable": "$.loop.done", "BooleanEquals": True, "Next": "Done"}],
                "Default": "Carry",
            },
            "Carry": {"Type": "Pass", "InputPath": "$.loop.rounds", "ResultPath": "$.rounds", "Next": "Step"},
            "Done": {"Type": "Succeed"},
        },
        "Prepare",
    )
    machine = engine.create_state_machine("t1", definition, arns)
    result = engine.run(machine, {"count": 6}, timeout_s=120)

    assert result.succeeded, (result.error, result.cause)
    assert result.output["squares"] == [n * n for n in range(6)]
    assert result.output["loop"] == {"rounds": 3, "done": True}
    assert seen[0] == "prepare:t1-prepare" and seen.count("square") == 6
    entered = result.states_entered()
    assert entered[0] == "Prepare" and entered.count("Step") == 3 and entered[-1] == "Done"


def test_map_iterations_run_concurrently(engine: LocalEngine) -> None:
    both_inside = threading.Barrier(2, timeout=30)

    def meet(event: dict[str, Any], context: Any) -> str:
        both_inside.wait()  # breaks (and fails the item) unless two iterations are inside at once
        return "met"

    arn = engine.register_function("t2-meet", meet)
    definition = asl(
        {
            "Both": {
                "Type": "Map",
                "ItemsPath": "$.items",
                "MaxConcurrency": 2,
                "ItemProcessor": {
                    "ProcessorConfig": {"Mode": "INLINE"},
                    "StartAt": "Meet",
                    "States": {"Meet": {"Type": "Task", "Resource": arn, "End": True}},
                },
                "End": True,
            }
        },
        "Both",
    )
    result = engine.run(engine.create_state_machine("t2", definition), {"items": [{"n": 1}, {"n": 2}]}, timeout_s=120)
    assert result.succeeded, (result.error, result.cause)
    assert result.output == ["met", "met"]


def test_errors_are_retried_by_class_name_then_caught(engine: LocalEngine) -> None:
    calls = {"flaky": 0, "broken": 0}

    def flaky(event: dict[str, Any], context: Any) -> str:
        calls["flaky"] += 1
        if calls["flaky"] < 3:
            raise TransientFaultError("storage hiccup")
        return "ok"

    def broken(event: dict[str, Any], context: Any) -> str:
        calls["broken"] += 1
        raise PermanentFaultError("bad footer checksum at offset 0x1ff")

    retry = [{"ErrorEquals": ["TransientFaultError"], "IntervalSeconds": 1, "MaxAttempts": 3, "BackoffRate": 1.0}]
    definition = asl(
        {
            "Flaky": {
                "Type": "Task",
                "Resource": "${Flaky}",
                "Retry": retry,
                "ResultPath": "$.flaky",
                "Next": "Broken",
            },
            "Broken": {
                "Type": "Task",
                "Resource": "${Broken}",
                "Retry": retry,
                "Catch": [{"ErrorEquals": ["States.ALL"], "ResultPath": "$.failure", "Next": "Failed"}],
                "End": True,
            },
            "Failed": {"Type": "Fail", "ErrorPath": "$.failure.Error", "CausePath": "$.failure.Cause"},
        },
        "Flaky",
    )
    subs = {
        "Flaky": engine.register_function("t3-flaky", flaky),
        "Broken": engine.register_function("t3-broken", broken),
    }
    result = engine.run(engine.create_state_machine("t3", definition, subs), {}, timeout_s=120)

    assert calls == {"flaky": 3, "broken": 1}  # retried twice; the permanent fault is not retried
    assert result.status == "FAILED"
    assert result.error == "PermanentFaultError"
    assert result.cause is not None
    assert json.loads(result.cause)["errorMessage"] == "bad footer checksum at offset 0x1ff"


def test_the_context_counts_down_from_the_function_timeout(engine: LocalEngine) -> None:
    remaining: list[int] = []

    def look(event: dict[str, Any], context: Any) -> None:
        remaining.append(context.get_remaining_time_in_millis())

    arn = engine.register_function("t4-look", look, timeout_s=60)
    result = engine.run(
        engine.create_state_machine("t4", asl({"L": {"Type": "Task", "Resource": arn, "End": True}}, "L")), {}
    )
    assert result.succeeded
    assert 0 < remaining[0] <= 60_000


def test_a_missing_substitution_is_named() -> None:
    with pytest.raises(EngineError, match=r"\$\{CompressArn\}"):
        substitute('{"Resource": "${CompressArn}"}', {"PrepareArn": "arn:x"})


def test_one_engine_per_process(engine: LocalEngine) -> None:
    with pytest.raises(EngineError, match="already running"):
        LocalEngine().start()


def test_one_state_machine_runs_many_executions_side_by_side(engine: LocalEngine) -> None:
    def echo(event: dict[str, Any], context: Any) -> dict[str, Any]:
        return {"seen": event["n"]}

    arn = engine.register_function("t5-echo", echo)
    machine = engine.create_state_machine("t5", asl({"E": {"Type": "Task", "Resource": arn, "End": True}}, "E"))
    started = [engine.start_execution(machine, {"n": n}, name=f"run-{n}") for n in range(4)]
    results = [engine.wait(execution, timeout_s=120) for execution in started]
    assert [r.output for r in results] == [{"seen": n} for n in range(4)]


def test_the_engine_does_not_import_ec2_for_the_batch_task_service() -> None:
    """moto's interpreter imports moto.batch.utils; moto.batch's __init__ would import all of EC2's models."""
    code = (
        "import sys, statemachine.engine, moto.batch.utils; "
        "print(sorted(name for name in sys.modules if name.startswith(('moto.ec2', 'moto.batch.models'))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "[]"
