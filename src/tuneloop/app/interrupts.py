"""Ctrl-C and SIGTERM: the command stops within seconds and says, in one line, where it stopped.

SIGTERM is turned into the same unwinding as Ctrl-C (``Terminated`` is a ``KeyboardInterrupt``): the flow
run is recorded as crashed on the Prefect server, the temporary server is stopped, and the exit code is
128 + the signal (130, 143). Nothing is rolled back because nothing needs to be: every stage writes its
files atomically and the ledger is committed after each step, so the next run picks up from there
(training from its last checkpoint).
"""

from __future__ import annotations

import logging
import signal
from types import TracebackType

# the stages as the retrain flow runs them (tasks/<module>.py), and the support modules (lib/<module>.py) whose
# work is a stage's even when a flow calls them directly (the ledger's commit) or another stage does
_STAGES = {"collect": "collect", "quality": "quality", "snapshot": "snapshot", "export": "export",
           "train_local": "train", "train_openai": "train", "train_pool": "train", "evaluate": "evaluate",
           "register": "register", "drift": "drift", "distill": "distill", "preflight": "preflight"}
_LIB_STAGES = {"sources": "collect", "gate": "quality", "gx": "quality", "tokens": "export", "base_model": "train",
               "checkpoints": "train", "lora": "train", "torchrun": "train", "answerers": "evaluate",
               "registry": "register", "candidate_run": "register", "ledger": "ledger commit"}


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, as Ctrl-C raises KeyboardInterrupt."""

    signum = signal.SIGTERM


def raise_terminated(signum, frame) -> None:
    raise Terminated()


def exit_code(exc: BaseException) -> int:
    return 128 + (signal.SIGTERM if _chain_has(exc, Terminated) else signal.SIGINT)


def _chain_has(exc: BaseException | None, kind: type) -> bool:
    return any(isinstance(e, kind) for e in _chain(exc))


def _chain(exc: BaseException | None):
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _frames(tb: TracebackType | None):
    while tb is not None:
        yield tb.tb_frame
        tb = tb.tb_next


def stage_of(exc: BaseException) -> str | None:
    """The stage the program was in when the signal arrived: the innermost stage module (or support module
    that belongs to one) on the stack;
    "flow" inside a flow between stages; None before any flow started."""
    in_flow = False
    for link in _chain(exc):
        modules = [frame.f_globals.get("__name__", "") for frame in _frames(link.__traceback__)]
        stages = [_STAGES.get(name, name) if layer == "tasks" else _LIB_STAGES[name]
                  for layer, name in (m.split(".")[1:3] for m in modules if m.startswith(("tuneloop.tasks.",
                                                                                           "tuneloop.lib.")))
                  if layer == "tasks" or name in _LIB_STAGES]
        if stages:
            return stages[-1]
        in_flow = in_flow or any(m.startswith("tuneloop.flows.") for m in modules)
    return "flow" if in_flow else None


def interrupted_message(exc: BaseException) -> str:
    how = "SIGTERM" if _chain_has(exc, Terminated) else "Ctrl-C"
    stage = stage_of(exc)
    where = {None: "before the flow started", "flow": "between stages"}.get(stage, f"during {stage}")
    then = "resumes training from the last checkpoint" if stage == "train" else "picks up where this one stopped"
    return f"interrupted ({how}): stopped {where}; the state is consistent and the next run {then}"


class _InterruptCrashFilter(logging.Filter):
    """Prefect logs an interrupted task and flow as crashed, several lines each; the command says it in one."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and isinstance(exc, KeyboardInterrupt | SystemExit):
            return False
        message = record.getMessage()  # "Crash detected! Execution was aborted by ...", "Finished in state Crashed(...)"
        return not ("aborted by an interrupt signal" in message or "aborted by a termination signal" in message)


def quiet_interrupt_logs() -> None:
    for name in ("prefect.flow_runs", "prefect.task_runs", "prefect.flow_engine", "prefect.task_engine"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _InterruptCrashFilter) for f in logger.filters):
            logger.addFilter(_InterruptCrashFilter())
