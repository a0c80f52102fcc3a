"""Real services started by tests: a Prefect server and workers, each in its own process group.

The server runs on a free loopback port with SQLite in a temporary folder; every process started here is
stopped here (by process group, since a Prefect worker ignores its first SIGTERM for a while).
"""

from __future__ import annotations

import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_in_thread(handler: type[BaseHTTPRequestHandler], tls: tuple[Path, Path] | None = None) -> ThreadingHTTPServer:
    """A fake of a remote API on a free loopback port, served from a daemon thread; HTTPS with ``tls``
    (certificate, key)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    if tls is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(*tls)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def stop_serving(server: ThreadingHTTPServer | None) -> None:
    if server is not None:
        server.shutdown()
        server.server_close()


def stop_group(proc: subprocess.Popen, grace: float = 10) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


def answers(url: str) -> bool:
    """Whether a server answers ``url`` with 200 yet (refused and timed-out connections are "not yet")."""
    try:
        return urllib.request.urlopen(url, timeout=2).status == 200
    except OSError:
        return False


def wait_until(check, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(interval)


class PrefectServer:
    """``prefect server start`` for one test; ``env`` is what a client or worker needs to talk to it."""

    def __init__(self, root: Path):
        self.root = root
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/api"
        self.env = {
            **os.environ,
            "PREFECT_HOME": str(root / "prefect-home"),
            "PREFECT_API_URL": self.url,
            "PREFECT_LOCAL_STORAGE_PATH": str(root / "prefect-results"),  # results readable by every process here
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "DO_NOT_TRACK": "true",
            "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{root / 'prefect.db'}",
        }
        self.procs: list[subprocess.Popen] = []

    def spawn(self, args: list[str], log: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.Popen:
        out = (self.root / log).open("ab")
        proc = subprocess.Popen(args, env={**self.env, **(env or {})}, cwd=cwd, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        self.procs.append(proc)
        return proc

    def cli(self, *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 180) -> str:
        done = subprocess.run([str(BIN / "prefect"), *args], env={**self.env, **(env or {})}, cwd=cwd,
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise AssertionError(f"prefect {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
        return done.stdout

    def start(self) -> PrefectServer:
        self.root.mkdir(parents=True, exist_ok=True)
        server = self.spawn([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port",
                             str(self.port)], "server.log")

        def healthy():
            if server.poll() is not None:
                raise AssertionError(f"prefect server exited:\n{(self.root / 'server.log').read_text()[-3000:]}")
            return answers(f"{self.url}/health")

        wait_until(healthy, 120, "the Prefect server to answer /api/health")
        return self

    def worker(self, pool: str, env: dict | None = None, log: str = "worker.log") -> subprocess.Popen:
        return self.spawn([str(BIN / "prefect"), "worker", "start", "--pool", pool, "--type", "process"], log, env)

    def stop(self) -> None:
        for proc in reversed(self.procs):
            stop_group(proc)

    @contextmanager
    def client_settings(self):
        """Point this test process's Prefect client at the server."""
        from prefect.logging.handlers import APILogHandler
        from prefect.settings import PREFECT_API_URL, PREFECT_LOCAL_STORAGE_PATH, temporary_settings

        with temporary_settings({PREFECT_API_URL: self.url,
                                 PREFECT_LOCAL_STORAGE_PATH: Path(self.env["PREFECT_LOCAL_STORAGE_PATH"])}):
            try:
                yield
            finally:
                APILogHandler().flush()  # send the run logs while the server is still up


@contextmanager
def prefect_server(root: Path):
    server = PrefectServer(root)
    try:
        yield server.start()
    finally:
        server.stop()
