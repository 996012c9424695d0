"""Every error the ASL's Retry and Catch name is an exception class the handlers can raise: the interpreter (and AWS)
match a failed Task by the exception's class name, so a renamed class silently turns a retry into a failure."""

from __future__ import annotations

import ast
import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
ASL = REPO / "statemachine" / "imaging.asl.json"
SERVICE_ERRORS = ("States.", "Lambda.", "Runtime.")


def error_names(node: Any) -> set[str]:
    names: set[str] = set()
    if isinstance(node, dict):
        for key, value in node.items():
            names |= set(value) if key == "ErrorEquals" else error_names(value)
    elif isinstance(node, list):
        for item in node:
            names |= error_names(item)
    return names


def exception_classes() -> set[str]:
    """Names of the classes defined under functions/ (every class: the test checks names, not ancestry)."""
    found: set[str] = set()
    for path in (REPO / "functions").rglob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        found |= {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
    return found


def test_every_error_the_asl_names_is_a_class_of_ours() -> None:
    named = {name for name in error_names(json.loads(ASL.read_text())) if not name.startswith(SERVICE_ERRORS)}
    assert named, "the ASL names no error of its own: the test would prove nothing"
    assert named - exception_classes() == set()
