"""A fake OpenAI API on 127.0.0.1, for the real ``openai`` SDK through ``base_url``.

It implements what the fine-tuning backend uses (files; fine_tuning.jobs create / retrieve / list with
a metadata filter / cancel / events / checkpoints; chat.completions) with scripted job lifecycles and
faults injected per route, so the tests exercise the SDK's real HTTP behaviour, retries included.
Everything it receives is kept in ``requests`` so a test can assert what was (not) sent.
"""

from __future__ import annotations

import json
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl, urlparse

from services import serve_in_thread, stop_serving


@dataclass
class Fault:
    """Answer the next matching request with ``status`` (after doing the work when ``after_effect``), or
    drop the connection when status is 0."""

    method: str
    path: str  # a regex on the path
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    after_effect: bool = False
    body: dict[str, Any] = field(default_factory=lambda: {"error": {"message": "injected", "type": "server_error"}})


@dataclass
class Lifecycle:
    """The statuses a new job goes through, one per retrieve, and how it ends."""

    statuses: list[str] = field(default_factory=lambda: ["validating_files", "queued", "running", "running", "succeeded"])
    error: dict[str, Any] | None = None  # set on a failed job; ``{}`` while running mimics the real API
    running_error: dict[str, Any] | None = field(default_factory=dict)
    metrics_per_poll: int = 2


class FakeOpenAI:
    def __init__(self, lifecycle: Lifecycle | None = None,
                 answer: Callable[[str, list[dict]], str] | None = None):
        self.lifecycle = lifecycle or Lifecycle()
        self.answer = answer or (lambda model, messages: "queue: billing")
        self.files: dict[str, dict[str, Any]] = {}
        self.contents: dict[str, bytes] = {}
        self.jobs: dict[str, dict[str, Any]] = {}
        self.polls: dict[str, int] = {}
        self.events: dict[str, list[dict[str, Any]]] = {}
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        self.lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self.n_files = self.n_jobs = 0  # ids are never reused, as on the real service
        self.valid_key: str | None = None  # when set, any other key gets a 401 that echoes it back
        # Azure OpenAI's chat goes to /openai/deployments/NAME/...: the model NAME serves, None where there is no
        # such deployment (a 404 DeploymentNotFound, as Azure answers). Unset: NAME is the model.
        self.deployed: Callable[[str], str | None] | None = None

    # ---- server ----------------------------------------------------------------------------------
    def __enter__(self) -> FakeOpenAI:
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _handle(self, method: str):
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                status, payload, headers = fake.dispatch(method, self.path, dict(self.headers), body)
                if status == 0:  # drop the connection without an answer
                    self.close_connection = True
                    self.connection.close()
                    return
                raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json" if not isinstance(payload, bytes) else "text/csv")
                self.send_header("content-length", str(len(raw)))
                for k, v in headers.items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(raw)

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

            def do_DELETE(self):
                self._handle("DELETE")

        self._server = serve_in_thread(Handler)
        return self

    def __exit__(self, *exc) -> None:
        stop_serving(self._server)

    @property
    def base_url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    # ---- routing ---------------------------------------------------------------------------------
    def dispatch(self, method: str, raw_path: str, headers: dict[str, str], body: bytes):
        url = urlparse(raw_path)
        path, query = url.path, dict(parse_qsl(url.query, keep_blank_values=True))
        if path.startswith("/openai/"):  # Azure OpenAI's layout: {endpoint}/openai/...?api-version=
            path = "/v1/" + path[len("/openai/"):]
        with self.lock:
            self.requests.append((method, raw_path, headers, body))
            fault = next((f for f in self.faults if f.method == method and re.fullmatch(f.path, path)), None)
            if fault is not None:
                self.faults.remove(fault)
                if not fault.after_effect:
                    return fault.status, fault.body, fault.headers
            result = self.route(method, path, query, headers, body)
            if fault is not None:
                return fault.status, fault.body, fault.headers
            return result

    def route(self, method, path, query, headers, body):
        auth = headers.get("authorization") or headers.get("Authorization") or headers.get("api-key") or ""
        if self.valid_key and self.valid_key not in auth:
            return 401, {"error": {"message": f"Incorrect API key provided: {auth.removeprefix('Bearer ')}.",
                                   "type": "invalid_request_error", "code": "invalid_api_key"}}, {}
        if method == "POST" and path == "/v1/files":
            return self.create_file(headers, body)
        if m := re.fullmatch(r"/v1/files/([^/]+)", path):
            return (200, self.files[m[1]], {}) if m[1] in self.files else self.not_found("file", m[1])
        if m := re.fullmatch(r"/v1/files/([^/]+)/content", path):
            return (200, self.contents[m[1]], {}) if m[1] in self.contents else self.not_found("file", m[1])
        if method == "POST" and path == "/v1/fine_tuning/jobs":
            return self.create_job(json.loads(body))
        if method == "GET" and path == "/v1/fine_tuning/jobs":
            return self.list_jobs(query)
        if m := re.fullmatch(r"/v1/fine_tuning/jobs/([^/]+)", path):
            return self.retrieve_job(m[1])
        if m := re.fullmatch(r"/v1/fine_tuning/jobs/([^/]+)/cancel", path):
            job = self.jobs[m[1]]
            job["status"] = "cancelled"
            return 200, job, {}
        if m := re.fullmatch(r"/v1/fine_tuning/jobs/([^/]+)/events", path):
            events = list(reversed(self.events.get(m[1], [])))  # newest first, as the API lists them
            return 200, {"object": "list", "data": events, "has_more": False}, {}
        if m := re.fullmatch(r"/v1/fine_tuning/jobs/([^/]+)/checkpoints", path):
            job = self.jobs[m[1]]
            data = [{"object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{m[1]}-{s}", "created_at": 0,
                     "fine_tuned_model_checkpoint": f"{job['fine_tuned_model'] or 'ft:x'}:ckpt-step-{s}",
                     "fine_tuning_job_id": m[1], "step_number": s, "metrics": {"step": s}}
                    for s in (2, 4)] if job["status"] == "succeeded" else []
            return 200, {"object": "list", "data": data, "has_more": False}, {}
        deployment = re.fullmatch(r"/v1/deployments/([^/]+)/chat/completions", path)
        if method == "POST" and (path == "/v1/chat/completions" or deployment):
            req = json.loads(body)
            if deployment:
                req["model"] = self.deployed(deployment[1]) if self.deployed else deployment[1]
                if req["model"] is None:
                    return 404, {"error": {"code": "DeploymentNotFound", "message": "The API deployment for this "
                                           "resource does not exist. If you created the deployment within the last "
                                           "5 minutes, please wait a moment and try again."}}, {}
            text = self.answer(req["model"], req["messages"])
            return 200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": req["model"],
                         "choices": [{"index": 0, "finish_reason": "stop",
                                      "message": {"role": "assistant", "content": text}}],
                         "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}, {}
        return 404, {"error": {"message": f"no route {method} {path}", "type": "invalid_request_error"}}, {}

    @staticmethod
    def not_found(kind: str, ident: str):
        return 404, {"error": {"message": f"No such {kind}: {ident}", "type": "invalid_request_error",
                               "code": "not_found"}}, {}

    # ---- files -------------------------------------------------------------------------------------
    def create_file(self, headers, body):
        message = BytesParser(policy=HTTP).parsebytes(
            f"content-type: {headers.get('content-type') or headers.get('Content-Type')}\r\n\r\n".encode() + body)
        fields = {part.get_param("name", header="content-disposition"): part for part in message.iter_parts()}
        data = fields["file"].get_payload(decode=True)
        self.n_files += 1
        ident = f"file-{self.n_files}"
        self.files[ident] = {"id": ident, "object": "file", "bytes": len(data), "created_at": int(time.time()),
                             "filename": fields["file"].get_filename(), "purpose": fields["purpose"].get_content(),
                             "status": "processed"}
        self.contents[ident] = data
        return 200, self.files[ident], {}

    # ---- jobs --------------------------------------------------------------------------------------
    def create_job(self, req):
        for key in ("training_file", "validation_file"):
            if req.get(key) and req[key] not in self.files:
                return 400, {"error": {"message": f"invalid file {req[key]}", "type": "invalid_request_error",
                                       "param": key, "code": "invalid_file"}}, {}
        self.n_jobs += 1
        ident = f"ftjob-{self.n_jobs}"
        hyper = ((req.get("method") or {}).get("supervised") or {}).get("hyperparameters") or {}
        self.jobs[ident] = {
            "id": ident, "object": "fine_tuning.job", "created_at": int(time.time()), "model": req["model"],
            "status": "validating_files", "training_file": req["training_file"],
            "validation_file": req.get("validation_file"), "metadata": req.get("metadata"),
            "suffix": req.get("suffix"), "seed": req.get("seed", 0), "fine_tuned_model": None, "finished_at": None,
            "error": None, "hyperparameters": {k: v for k, v in hyper.items()}, "organization_id": "org-fake",
            "result_files": [], "trained_tokens": None, "method": req.get("method"),
        }
        self.polls[ident] = 0
        self.events[ident] = [{"object": "fine_tuning.job.event", "id": f"ev-{ident}-0", "created_at": 0,
                               "level": "info", "message": "Validating training file", "type": "message"}]
        return 200, self.jobs[ident], {}

    def list_jobs(self, query):
        wanted = {k[len("metadata["):-1]: v for k, v in query.items() if k.startswith("metadata[")}
        jobs = [j for j in reversed(list(self.jobs.values()))
                if all((j.get("metadata") or {}).get(k) == v for k, v in wanted.items())]
        return 200, {"object": "list", "data": jobs, "has_more": False}, {}

    def retrieve_job(self, ident):
        if ident not in self.jobs:
            return self.not_found("job", ident)
        job = self.jobs[ident]
        if job["status"] in ("succeeded", "failed", "cancelled"):
            return 200, job, {}
        step = self.polls[ident] = self.polls[ident] + 1
        statuses = self.lifecycle.statuses
        status = statuses[min(step, len(statuses) - 1)]
        job["status"] = status
        events = self.events[ident]
        if status == "running":
            job["error"] = self.lifecycle.running_error
            for _ in range(self.lifecycle.metrics_per_poll):
                n = sum(e["type"] == "metrics" for e in events) + 1
                events.append({"object": "fine_tuning.job.event", "id": f"ev-{ident}-{len(events)}", "created_at": 0,
                               "level": "info", "message": f"Step {n}: training loss={1.0 / n:.3f}", "type": "metrics",
                               "data": {"step": n, "train_loss": 1.0 / n, "valid_loss": 1.1 / n,
                                        "train_mean_token_accuracy": 0.5 + n / 100}})
        if status == "failed":
            job["error"] = self.lifecycle.error or {"code": "invalid_training_file", "message": "bad line 3",
                                                    "param": "training_file"}
            job["finished_at"] = int(time.time())
        if status == "succeeded":
            result = f"file-result-{ident}"
            steps = sum(e["type"] == "metrics" for e in events)
            self.contents[result] = ("step,train_loss,valid_loss\n" + "".join(
                f"{s},{1.0 / s:.3f},{1.1 / s:.3f}\n" for s in range(1, steps + 1))).encode()
            self.files[result] = {"id": result, "object": "file", "bytes": len(self.contents[result]), "created_at": 0,
                                  "filename": "step_metrics.csv", "purpose": "fine-tune-results", "status": "processed"}
            job.update(fine_tuned_model=f"ft:{job['model']}:fake::{ident}", result_files=[result],
                       trained_tokens=1234, finished_at=int(time.time()), error=None)
            events.append({"object": "fine_tuning.job.event", "id": f"ev-{ident}-{len(events)}", "created_at": 0,
                           "level": "info", "message": "The job has successfully completed", "type": "message"})
        return 200, job, {}


def exported_files(tmp_path, n=12):
    """A small train/validation export, as the export stage would hand it to the backend."""
    import hashlib

    from tuneloop.core.records import ExportedDataset

    d = tmp_path / "export"
    d.mkdir(exist_ok=True)
    sha = {}
    for name, count in (("train.jsonl", n), ("validation.jsonl", 2)):
        (d / name).write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{name} q{i}"},
                                                               {"role": "assistant", "content": "a"}]}) + "\n"
                                      for i in range(count)))
        sha[name] = hashlib.sha256((d / name).read_bytes()).hexdigest()
    return ExportedDataset(dataset_version="v1", directory=d, train_path=d / "train.jsonl",
                           validation_path=d / "validation.jsonl", manifest_path=d / "manifest.json",
                           n_train=n, n_validation=2, sha256=sha)
