"""Run one vhdcore call in a child process with a timeout and an address-space cap.

Malformed input must give a typed error: never a hang, a crash or an unbounded allocation. Running the call in a
child process turns each of those into a test failure instead of killing (or stalling) the test session.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from typing import Any, Literal

Operation = Literal["open", "export", "map", "read", "check", "diff"]

DEFAULT_TIMEOUT = 60.0
DEFAULT_MEMORY_CAP = 3 * 1024**3  # bytes of address space for the child

_CHILD = textwrap.dedent(
    """
    import json, resource, sys
    cap = int(sys.argv[1])
    if cap > 0:
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    args = json.loads(sys.argv[2])
    import vhdcore

    def run():
        op = args["op"]
        kw = {} if args["max_depth"] is None else {"max_depth": args["max_depth"]}
        if op == "check":
            problems = vhdcore.check(args["path"], **kw)
            return {"problems": [
                {"kind": p.kind, "path": p.path, "field": p.field, "offset": p.offset, "message": p.message}
                for p in problems
            ]}
        if op == "diff":
            d = vhdcore.diff(args["path"], args["other"], **kw)
            return {"ranges": d.ranges, "total": d.total}
        chain = vhdcore.open_chain(args["path"], **kw)
        out = {"depth": chain.depth, "virtual_size": chain.virtual_size, "warnings": list(chain.warnings)}
        if op == "export":
            chain.export(args["out"], "raw")
        elif op == "map":
            chain.map()
        elif op == "read":
            chain.read(0, chain.virtual_size)
        return out

    try:
        result = {"ok": True, "result": run()}
    except BaseException as exc:  # report everything, including PanicException
        result = {
            "ok": False,
            "exc_class": type(exc).__name__,
            "mro": [c.__name__ for c in type(exc).__mro__],
            "kind": getattr(exc, "kind", None),
            "field": getattr(exc, "field", None),
            "offset": getattr(exc, "offset", None),
            "path": getattr(exc, "path", None),
            "message": str(exc),
        }
    sys.stdout.write("\\n@@RESULT@@" + json.dumps(result))
    """
)


@dataclass
class Outcome:
    """What the child process reported."""

    ok: bool
    result: dict[str, Any]
    exc_class: str | None = None
    mro: tuple[str, ...] = ()
    kind: str | None = None
    field: str | None = None
    offset: int | None = None
    path: str | None = None
    message: str = ""

    def describe(self) -> str:
        if self.ok:
            return f"no error (result {self.result})"
        return f"{self.exc_class}(kind={self.kind!r}, field={self.field!r}, offset={self.offset!r}): {self.message}"


def run_isolated(
    op: Operation,
    path: str,
    *,
    other: str | None = None,
    out: str | None = None,
    max_depth: int | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    memory_cap: int = DEFAULT_MEMORY_CAP,
) -> Outcome:
    """Run `op` on `path` in a child interpreter; fail (AssertionError) on hang, crash or a missing result."""
    args = {"op": op, "path": path, "other": other, "out": out, "max_depth": max_depth}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, str(memory_cap), json.dumps(args)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"vhdcore {op}({path!r}) hung: no answer within {timeout}s") from exc
    marker = "@@RESULT@@"
    if proc.returncode != 0 or marker not in proc.stdout:
        raise AssertionError(
            f"vhdcore {op}({path!r}) crashed: exit code {proc.returncode}, stderr: {proc.stderr.strip()[-2000:]}"
        )
    data = json.loads(proc.stdout.rsplit(marker, 1)[1])
    if data["ok"]:
        return Outcome(ok=True, result=data["result"])
    return Outcome(
        ok=False,
        result={},
        exc_class=data["exc_class"],
        mro=tuple(data["mro"]),
        kind=data["kind"],
        field=data["field"],
        offset=data["offset"],
        path=data["path"],
        message=data["message"],
    )
