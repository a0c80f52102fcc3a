"""The state folder: where every run's files, the registry and Prefect's database live.

Everything tuneloop writes goes under ``$TUNELOOP_HOME`` (default ``./.tuneloop``), so a demo or a test
is one folder to inspect or delete.
"""

from __future__ import annotations

import logging
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Set before prefect/mlflow/transformers are imported: each reads its settings at import time.
OFFLINE_AND_QUIET = {
    "DO_NOT_TRACK": "true",  # Prefect client and MLflow telemetry ("1" is not honoured by MLflow)
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    # progress bars are for terminals: in a run's log they are a line of carriage returns per download or save
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "PREFECT_UI_ENABLED": "true",
    # A fresh Prefect home migrates its SQLite database on first start: on 2 busy cores that can pass
    # Prefect's default 20 s, and the run would die before its first task.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


@dataclass(frozen=True)
class StateLayout:
    home: Path

    @property
    def prefect_home(self) -> Path:
        return self.home / "prefect"

    @property
    def mlflow_db(self) -> Path:
        return self.home / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.home / "mlartifacts"

    @property
    def tracking_uri(self) -> str:
        return f"sqlite:///{self.mlflow_db}"

    def resolve_tracking_uri(self, configured: str | None) -> str:
        """register.tracking_uri, else $MLFLOW_TRACKING_URI (e.g. a server backed by PostgreSQL), else the
        SQLite store in the state folder."""
        return configured or os.environ.get("MLFLOW_TRACKING_URI") or self.tracking_uri

    def artifacts_dir(self, tracking_uri: str) -> Path | None:
        """Where MLflow keeps artifacts: a local store in the state folder; a tracking server decides itself."""
        return None if tracking_uri.startswith(("http://", "https://", "databricks")) else self.mlflow_artifacts

    @property
    def runs(self) -> Path:
        return self.home / "runs"

    @property
    def landing(self) -> Path:
        return self.home / "landing"

    @property
    def datasets(self) -> Path:
        return self.home / "datasets"

    def snapshot(self, version: str) -> Path:
        """The file of a dataset version."""
        return self.datasets / f"{version}.jsonl"

    @property
    def models(self) -> Path:
        return self.home / "models"

    @property
    def ledger(self) -> Path:
        return self.home / "consumed.json"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's content, read in 1 MiB blocks (landing files, exports, config files)."""
    import hashlib

    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextmanager
def gc_paused():
    """For building millions of small acyclic objects (parsed records): with the cyclic collector on, each
    collection rescans every object built so far, and that took 2 s of a 5 s export of 100k examples.
    Nothing is lost: objects still die by reference counting; cycles wait for the next collection."""
    import gc

    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@contextmanager
def unique_temporary(path: Path):
    """A new file beside ``path`` under a name no other process uses, open for writing: yields (file, its
    path); flushed and fsynced on exit, removed if the block fails. The caller renames it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as fh:
            yield fh, tmp
            fh.flush()
            os.fsync(fh.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomically(path: Path, data: bytes) -> None:
    """Write, fsync, then rename: a reader (or a crash) never sees half a file, and two writers never
    share a temporary file."""
    with unique_temporary(path) as (fh, tmp):
        fh.write(data)
    tmp.replace(path)


_LOCKS: dict[Path, Any] = {}


@contextmanager
def run_lock(home: Path, what: str = "tuneloop run"):
    """One run per state folder at a time: two would consume the same files, train in the same checkpoint
    folder and register the same dataset twice. Held with an OS lock (``filelock``), so a killed run frees
    it; re-entrant within a process (the CLI takes it before Prefect starts, the flow again inside it)."""
    import json
    import socket
    from datetime import UTC, datetime

    from filelock import FileLock, Timeout

    from tuneloop.core.records import TuneloopError

    home.mkdir(parents=True, exist_ok=True)
    lock = _LOCKS.setdefault(home, FileLock(home / "run.lock", thread_local=False))
    holder = home / "run.lock.json"
    try:
        lock.acquire(timeout=0)
    except Timeout:
        try:
            who = json.loads(holder.read_text())
            by = f" ({who['what']}, pid {who['pid']} on {who['host']}, since {who['since']})"
        except (OSError, ValueError, KeyError):
            by = ""
        raise TuneloopError(f"another run is using the state folder {home}{by}: one run per state folder at a "
                            "time; this one did nothing. Wait for it to finish, or use another TUNELOOP_HOME") from None
    try:
        if lock.lock_counter == 1:
            write_atomically(holder, json.dumps({
                "what": what, "pid": os.getpid(), "host": socket.gethostname(),
                "since": datetime.now(UTC).isoformat(timespec="seconds")}).encode())
        yield
    finally:
        lock.release()


def tuneloop_home() -> Path:
    return Path(os.environ.get("TUNELOOP_HOME") or Path.cwd() / ".tuneloop").expanduser().resolve()


class _NoTracebackFilter(logging.Filter):
    """Prefect's engines log every failure with its stack; for an expected error (a message for the user: bad
    config, failed gate, a full disk) the stack only hides the one line that says what to fix. Any other
    exception is a bug and keeps its traceback."""

    def __init__(self, name: str, expected) -> None:
        super().__init__()
        self.kind, self.expected = name, expected

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None and self.expected(record.exc_info[1]):
            record.exc_info = None
            record.exc_text = None
        return True


def quiet_tracebacks(kind: str, expected) -> None:
    """Log failures for which ``expected(exc)`` is true without their traceback (once per ``kind``)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoTracebackFilter) and f.kind == kind for f in logger.filters):
            logger.addFilter(_NoTracebackFilter(kind, expected))


def _is_user_error(exc: BaseException) -> bool:
    from tuneloop.core.records import TuneloopError

    return isinstance(exc, TuneloopError)


def quiet_user_errors() -> None:
    quiet_tracebacks("user-error", _is_user_error)


def prepare_state(home: Path | None = None) -> StateLayout:
    """Create the state folder and point Prefect at it; telemetry off unless the user set otherwise."""
    layout = StateLayout(home or tuneloop_home())
    for folder in (layout.home, layout.prefect_home, layout.runs, layout.landing, layout.datasets, layout.models):
        folder.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TUNELOOP_HOME", str(layout.home))
    os.environ.setdefault("PREFECT_HOME", str(layout.prefect_home))
    for key, value in OFFLINE_AND_QUIET.items():
        os.environ.setdefault(key, value)
    quiet_user_errors()
    return layout
