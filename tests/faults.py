"""Fault injection: run the ``tuneloop`` CLI in a child process that SIGKILLs itself at a named point.

A kill is what a power cut, the OOM killer or ``kill -9`` does: no ``finally``, no handler, no flush.
The point is ``module:attribute`` (dotted attributes for methods, e.g.
``mlflow.tracking.client:MlflowClient.create_model_version``), patched where the caller looks it up;
``when`` is ``before`` or ``after`` the call, ``nth`` which call (1 = the first). Product code carries
no test hooks: the child patches the function, then runs the CLI's ``main``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import functools, importlib, json, os, signal, sys
spec = json.loads(sys.argv[1])
module_name, _, attr_path = spec["point"].partition(":")
owner = importlib.import_module(module_name)
parts = attr_path.split(".")
for part in parts[:-1]:
    owner = getattr(owner, part)
original = getattr(owner, parts[-1])
calls = {"n": 0}

def _die():
    sys.stdout.flush(); sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)

def around(call):
    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == spec["nth"] and spec["when"] == "before":
            _die()
        result = call(*args, **kwargs)
        if calls["n"] == spec["nth"] and spec["when"] == "after":
            _die()
        return result
    return wrapper

# a Prefect task or flow is called through its .fn: patch that, so the task machinery still runs
if hasattr(original, "fn") and hasattr(original, "with_options"):
    original.fn = functools.wraps(original.fn)(around(original.fn))
else:
    setattr(owner, parts[-1], functools.wraps(original)(around(original)))
sys.argv = ["tuneloop", *spec["args"]]
from tuneloop.app.cli import main
main()
"""


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 600,
            cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The CLI in a child process, as a user runs it (no fault)."""
    return subprocess.run([sys.executable, "-m", "tuneloop.app.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})


def run_cli_killed_at(point: str, *args: str, when: str = "after", nth: int = 1, env: dict[str, str] | None = None,
                      timeout: float = 600, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """The CLI in a child process that SIGKILLs itself at ``point``; asserts that it did die there."""
    spec = {"point": point, "when": when, "nth": nth, "args": list(args)}
    # its own process group: the Prefect server the killed run started is killed with it, as a power cut would
    # (output to files, not pipes: a server that outlived the run would hold a pipe open)
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        child = subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(spec)], cwd=cwd, stdout=out, stderr=err,
                                 text=True, env={**os.environ, **(env or {})}, start_new_session=True)
        try:
            child.wait(timeout=timeout)
        finally:
            try:
                os.killpg(child.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out.seek(0)
        err.seek(0)
        proc = subprocess.CompletedProcess(child.args, child.returncode, out.read(), err.read())
    assert proc.returncode == -signal.SIGKILL, (
        f"the run was not killed at {point} (exit {proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc
