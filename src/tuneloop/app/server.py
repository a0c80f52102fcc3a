"""The temporary Prefect API server a ``tuneloop`` command runs its flow against.

Without ``PREFECT_API_URL`` Prefect starts a server of its own as a child in the caller's process group:
a Ctrl-C in the terminal reaches it too, it dies first, and the interrupted run then retries the dead
server for minutes. Here the command starts the same server (``prefect.server.api.server:create_app``
under uvicorn, as Prefect's ``SubprocessASGIServer`` does) in a session of its own, so a terminal's
Ctrl-C reaches only the command, which stops the flow, lets Prefect record that, and stops the server.
The server also watches its stdin, a pipe from the command: when the command dies by any means
(``kill -9`` included) the pipe closes and the server exits, so none outlives its run.

A server that cannot start says why in one line: a full disk, or a damaged ``prefect.db`` (it holds
only run history: move it aside), not a timeout to raise.

``python -m tuneloop.app.server FD`` is the server side: it serves on the listening socket FD.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from tuneloop.core.records import TuneloopError

STARTUP_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"
_DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
# what SQLite, SQLAlchemy and the OS say when a write does not fit, or a database file is not one
_FULL_MARKERS = ("database or disk is full", "no space left on device", "disk quota exceeded", "file too large")
_DAMAGED_MARKERS = ("file is not a database", "database disk image is malformed", "malformed database schema")


class ServerProblem(TuneloopError):
    """The temporary Prefect server could not start or stopped working; the message says what to do."""


def prefect_database() -> Path:
    """The SQLite file the server keeps run history in (Prefect's default under PREFECT_HOME)."""
    url = os.environ.get("PREFECT_SERVER_DATABASE_CONNECTION_URL") or os.environ.get("PREFECT_API_DATABASE_CONNECTION_URL")
    if url and url.startswith("sqlite"):
        return Path(url.split(":///", 1)[-1])
    home = os.environ.get("PREFECT_HOME") or Path.home() / ".prefect"
    return Path(home).expanduser() / "prefect.db"


def disk_full_message(where: Path | str, what: str) -> str:
    folder = Path(where)
    folder = folder if folder.is_dir() else folder.parent
    return (f"no space left to write {what}: the disk (or your quota) under {folder} is full; free space there "
            f"(see `df -h {folder}`) and run again: the next run resumes where this one stopped")


def damaged_database_message(db: Path) -> str:
    return (f"the Prefect database {db} is damaged; it holds only run history (your data, models and registry are "
            f"elsewhere): move it aside (`mv {db} {db}.damaged`) and run again, and a new one is created")


def diagnose(text: str, db: Path) -> str | None:
    """One line for a full disk or a damaged database named in an error text or a server log; None otherwise."""
    low = text.lower()
    if any(marker in low for marker in _FULL_MARKERS) or ("disk i/o error" in low and _nearly_full(db.parent)):
        return disk_full_message(db, f"the Prefect database {db}")
    if any(marker in low for marker in _DAMAGED_MARKERS):
        return damaged_database_message(db)
    if "disk i/o error" in low:  # SQLite's word for a write that failed: a size limit, a full quota, a bad disk
        return (f"the Prefect database {db} could not be written (disk I/O error): free space under {db.parent} "
                f"(see `df -h {db.parent}`) or lift the file size limit (`ulimit -f`); if that is not it, move the "
                f"file aside (`mv {db} {db}.damaged`): it holds only run history, and the next run creates a new one")
    return None


def _nearly_full(folder: Path) -> bool:
    import shutil

    try:
        return shutil.disk_usage(folder).free < 64 << 20
    except OSError:
        return False


def disk_full_in(exc: BaseException) -> str | None:
    """One line when ``exc`` (or what caused it) is a write that did not fit; None otherwise."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _DISK_FULL:
            where = exc.filename or os.environ.get("TUNELOOP_HOME") or Path.cwd()
            return disk_full_message(where, str(exc.filename or "the state folder"))
        if "database or disk is full" in str(exc).lower():
            where = os.environ.get("TUNELOOP_HOME") or Path.cwd()
            return disk_full_message(where, "a SQLite database (MLflow registry or Prefect history)")
        exc = exc.__cause__ or exc.__context__
    return None


def quiet_disk_full_logs() -> None:
    """For a full disk the stack only hides the one line that says where to free space (printed last)."""
    from tuneloop.core.state import quiet_tracebacks

    quiet_tracebacks("disk-full", lambda exc: disk_full_in(exc) is not None)


class LocalServer:
    """A Prefect API server in its own session, stopped by ``stop`` or by this process's end."""

    def __init__(self, process: subprocess.Popen, port: int, log: Path, db: Path):
        self.process, self.port, self.log, self.db = process, port, log, db

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    @classmethod
    def start(cls, timeout: float | None = None) -> LocalServer:
        db = prefect_database()
        log = db.parent / "server.log"
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
            log_file = log.open("wb")
        except OSError as exc:
            raise ServerProblem(disk_full_in(exc) or f"cannot write the Prefect server log {log}: {exc}") from None
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))  # the port is ours from here: no race with another run
        listener.listen(128)
        env = {**os.environ, "PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1",
               "PREFECT__SERVER_FINAL": "1"}
        env.pop("PREFECT_API_URL", None)
        with log_file, listener:
            process = subprocess.Popen(
                [sys.executable, "-m", "tuneloop.app.server", str(listener.fileno())],
                stdin=subprocess.PIPE, stdout=log_file, stderr=subprocess.STDOUT, env=env,
                pass_fds=(listener.fileno(),), start_new_session=True)
            server = cls(process, listener.getsockname()[1], log, db)
        try:
            server._wait_healthy(timeout or float(os.environ.get(STARTUP_TIMEOUT_ENV) or 120))
        except BaseException:  # a problem, or Ctrl-C while it starts
            server.stop()
            raise
        return server

    def _wait_healthy(self, timeout: float) -> None:
        import urllib.error
        import urllib.request

        direct = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # never via $http_proxy
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerProblem(self._startup_failure())
            try:
                with direct.open(f"{self.api_url}/health", timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise ServerProblem(diagnose(self.log_text(), self.db) or (
            f"the local Prefect API server did not answer within {timeout:g} s ({STARTUP_TIMEOUT_ENV}); its log is "
            f"{self.log}. On a busy machine raise that timeout, or start a server with `make prefect-ui` and set "
            "PREFECT_API_URL=http://127.0.0.1:4200/api"))

    def _startup_failure(self) -> str:
        text = self.log_text()
        found = diagnose(text, self.db)
        if found:
            return found
        if _nearly_full(self.db.parent):  # the disk was too full even for the server's log
            return disk_full_message(self.db, f"the Prefect database {self.db}")
        last = next((line for line in reversed(text.splitlines()) if line.strip()), "no output")
        return (f"the local Prefect API server exited while starting (exit code {self.process.returncode}): "
                f"{last.strip()[:300]}; its log is {self.log}")

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-20_000:]
        except OSError:
            return ""

    def problem(self) -> str | None:
        """A full disk or damaged database the server ran into (it answers 500s then), from its log."""
        return diagnose(self.log_text(), self.db)

    def stop(self, timeout: float = 5.0) -> None:
        """Close its stdin (it shuts down), then SIGTERM and SIGKILL its session if it lingers."""
        with contextlib.suppress(OSError):
            if self.process.stdin and not self.process.stdin.closed:
                self.process.stdin.close()
        for sig in (None, signal.SIGTERM, signal.SIGKILL):
            if self.process.poll() is not None:
                return
            if sig is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.process.pid, sig)  # the group is its own (new session) and is alive
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=timeout)


def _drain_prefect_services(timeout: float = 5.0) -> None:
    """Send the logs and events still queued while the server is up (Prefect drains them at exit otherwise,
    after the server is gone, and retries)."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    for worker in (APILogWorker, EventsWorker):
        with contextlib.suppress(Exception):
            worker.drain_all(timeout=timeout, at_exit=False)


@contextlib.contextmanager
def prefect_api() -> Iterator[LocalServer | None]:
    """The API the flows run against: PREFECT_API_URL's server if set, else a temporary one started here."""
    quiet_disk_full_logs()
    if os.environ.get("PREFECT_API_URL"):
        yield None
        return
    server = LocalServer.start()
    # for this process and any it starts; no UI is served, so no "View at" links to a server about to stop
    settings = {"PREFECT_API_URL": server.api_url, "PREFECT_UI_URL": ""}
    previous = {key: os.environ.get(key) for key in settings}
    os.environ.update(settings)
    try:
        with contextlib.ExitStack() as stack:
            if "prefect" in sys.modules:  # settings already read from the environment: override them too
                import prefect.settings
                from prefect.settings import temporary_settings

                stack.enter_context(temporary_settings(
                    updates={getattr(prefect.settings, key): value for key, value in settings.items()}))
            try:
                yield server
            finally:
                _drain_prefect_services()
    finally:
        for key, value in previous.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def _serve(fd: int) -> None:
    """The server side: Prefect's API app on the inherited listening socket, until stdin closes."""
    import threading

    import uvicorn

    listener = socket.socket(fileno=fd)
    config = uvicorn.Config("prefect.server.api.server:create_app", factory=True, log_level="error",
                            lifespan="on")
    server = uvicorn.Server(config)

    def exit_when_the_command_is_gone() -> None:
        with contextlib.suppress(OSError):
            while os.read(0, 4096):  # b"" at EOF: the command closed the pipe, or died
                pass
        server.should_exit = True
        time.sleep(10)
        os._exit(1)  # a graceful shutdown that hangs

    threading.Thread(target=exit_when_the_command_is_gone, daemon=True).start()
    server.run(sockets=[listener])
    sys.exit(0 if server.started else 3)


if __name__ == "__main__":
    _serve(int(sys.argv[1]))
