"""An OpenAI-compatible door to the registered model: an app that calls a fine-tuned OpenAI model through the
OpenAI SDK switches to the champion by changing its base URL.

``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health``. The version at the alias (``champion`` by
default) is loaded once and then followed: a promotion or rollback is picked up within ``poll_seconds``, without
a restart. A new version is loaded in full before it replaces the old one in a single assignment, so a request
is answered by one version from start to end; a version that fails to load leaves the old one answering. Every
answer names its version (``system_fingerprint`` ``NAME@ALIAS:vN``, header ``x-tuneloop-model-version``).

Decoding is greedy, as in evaluation, so an answer is what the version was scored on: ``temperature`` and
``top_p`` are accepted and ignored; ``stop`` is honoured (the answer ends before it); one choice per request
(``n`` 1), no tools or logprobs. ``stream: true`` answers in server-sent events as OpenAI's do (chunks of
``chat.completion.chunk``, then ``data: [DONE]``; ``stream_options.include_usage`` adds the usage chunk), so
the SDK's ``stream=True`` reads it. A request without ``max_tokens`` may answer up to the server's
``max_tokens`` (``tuneloop serve-model --max-tokens``, 512), capped by the context left after the prompt: a
serving default, not the few tokens the version was evaluated with. Errors use OpenAI's JSON shape, so the
SDK raises its usual exceptions (400 ``BadRequestError``, 404 ``NotFoundError``, 503 when no version is
loaded).
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tuneloop.core.records import TuneloopError
from tuneloop.core.scrub import scrub

log = logging.getLogger("tuneloop.endpoint")

VERSION_HEADER = "x-tuneloop-model-version"
UNSUPPORTED = {"tools": "tool calls", "functions": "function calls", "tool_choice": "tool calls",
               "function_call": "function calls", "audio": "audio output", "logprobs": "log probabilities"}


@dataclass
class ServedVersion:
    """One loaded version. It answers one request at a time: a model's generate is not safe to share between
    threads, and on CPU two generations at once are no faster than one after the other."""

    name: str
    alias: str
    version: str
    created: int  # seconds since the epoch, when the version was registered
    champion: Any  # core.serving.ChampionModel
    folder: Path
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def fingerprint(self) -> str:
        return f"{self.name}@{self.alias}:v{self.version}"

    def answer(self, messages: list[dict], max_tokens: int | None, default_max_tokens: int | None = None):
        with self.lock:
            return self.champion.answer_chat(messages, max_tokens, default_max_tokens)

    def stream(self, messages: list[dict], max_tokens: int | None, default_max_tokens: int | None = None):
        """The answer in pieces, then the whole ChatAnswer. The lock is taken now, so a refusal (ChatRefused)
        is raised here, before any event is sent, and held until the last piece is read."""
        self.lock.acquire()
        try:
            pieces = self.champion.stream_chat(messages, max_tokens, default_max_tokens)
        except BaseException:
            self.lock.release()
            raise

        def locked():
            try:
                yield from pieces
            finally:
                self.lock.release()

        return locked()


class AliasFollower:
    """Keeps the version at ``name@alias`` loaded: ``check`` asks the registry and swaps when the alias moved."""

    def __init__(self, tracking_uri: str, name: str, alias: str, workdir: Path):
        from tuneloop.lib.registry import ModelRegistry

        self.tracking_uri, self.name, self.alias, self.workdir = tracking_uri, name, alias, workdir
        self.registry = ModelRegistry(tracking_uri, name, registry_uri=tracking_uri)
        self.client = self.registry.client
        self.current: ServedVersion | None = None
        self._reported: tuple[str, str] | None = None  # the last failure logged: not repeated every poll

    @property
    def model_ids(self) -> tuple[str, str]:
        """The names a request may give as ``model``."""
        return self.name, f"{self.name}@{self.alias}"

    def registered_version(self):
        """The MLflow model version at the alias now; a missing model or alias is one line saying what to do."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(self.name, self.alias)
        except MlflowException as exc:
            missing = exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")
            if not missing:
                raise TuneloopError(f"cannot read {self.name}@{self.alias} from the MLflow registry at "
                                    f"{self.tracking_uri}: {scrub(exc.message)}") from None
        try:
            self.client.get_registered_model(self.name)
            versions = sorted((str(v.version) for v in self.client.search_model_versions(f"name='{self.name}'")),
                              key=int)
        except MlflowException:
            raise TuneloopError(f"no registered model {self.name!r} at {self.tracking_uri}: `tuneloop run` trains "
                                "and registers one (or check register.model_name and register.tracking_uri)") from None
        raise TuneloopError(f"model {self.name!r} has no version at alias {self.alias!r} yet (versions: "
                            f"{', '.join(versions) or 'none'}): `tuneloop promote VERSION` sets the champion, "
                            "or pick another alias with --alias")

    def load(self, model_version) -> ServedVersion:
        """Download and load one version in full (the pyfunc's own loader), beside the one answering now."""
        import mlflow.artifacts
        import mlflow.pyfunc

        from tuneloop.core.serving import ChampionModel

        version = str(model_version.version)
        folder = Path(tempfile.mkdtemp(prefix=f"v{version}-", dir=self.workdir))
        try:
            # the version's own artifact location: a models:/ URI would be resolved against the global registry
            source = self.client.get_model_version_download_uri(self.name, version)
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=str(folder),
                                                        tracking_uri=self.tracking_uri)
            champion = mlflow.pyfunc.load_model(local).unwrap_python_model()
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        if not isinstance(champion, ChampionModel):
            shutil.rmtree(folder, ignore_errors=True)
            raise TuneloopError(f"{self.name} v{version} is not a tuneloop model (its pyfunc is "
                                f"{type(champion).__name__}): this endpoint serves models registered by tuneloop")
        return ServedVersion(self.name, self.alias, version, int(model_version.creation_timestamp or 0) // 1000,
                             champion, folder)

    def start(self) -> ServedVersion:
        """The first load, before the endpoint answers: any problem is the caller's to report."""
        model_version = self.registered_version()
        try:
            self.current = self.load(model_version)
        except TuneloopError:
            raise
        except Exception as exc:
            raise TuneloopError(f"{self.name} v{model_version.version} (@{self.alias}) cannot be loaded: "
                                f"{type(exc).__name__}: {scrub(str(exc))}") from None
        log.info(f"serving {self.name} v{self.current.version} (@{self.alias})")
        return self.current

    def check(self) -> bool:
        """One look at the alias; True when a newly loaded version now answers. Failures are logged (once
        each) and leave the version that answers in place."""
        try:
            model_version = self.registered_version()
        except Exception as exc:  # the registry unreachable, or the alias removed: keep answering
            self._report("registry", f"{scrub(str(exc))}; still serving {self._serving()}")
            return False
        version = str(model_version.version)
        if self.current is not None and version == self.current.version:
            self._reported = None
            return False
        try:
            loaded = self.load(model_version)
        except Exception as exc:
            self._report(version, f"{self.name} v{version} (@{self.alias}) failed to load, still serving "
                                  f"{self._serving()}: {type(exc).__name__}: {scrub(str(exc))}")
            return False
        previous, self.current = self.current, loaded  # one assignment: a request sees one version or the other
        self._reported = None
        log.info(f"serving {self.name} v{version} (@{self.alias}"
                 + (f", was v{previous.version})" if previous else ")"))
        if previous is not None:  # requests already running hold their own reference; the files are loaded
            shutil.rmtree(previous.folder, ignore_errors=True)
        return True

    def follow(self, poll_seconds: float, stop: threading.Event) -> None:
        while not stop.wait(poll_seconds):
            self.check()

    def _serving(self) -> str:
        return f"v{self.current.version}" if self.current else "nothing"

    def _report(self, key: str, message: str) -> None:
        if self._reported != (key, message):
            log.warning(message)
            self._reported = (key, message)


# ---- the OpenAI request, as far as a greedy local model can honour it -------------------------------------
class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: dict[str, Any] | None = None  # include_usage: a last chunk with the usage
    temperature: float | None = Field(None, ge=0, le=2)  # accepted; decoding is greedy
    top_p: float | None = Field(None, ge=0, le=1)  # accepted; decoding is greedy
    stop: str | list[str] | None = None  # honoured: the answer ends before the first of them, as OpenAI's does


class RequestRefused(Exception):
    """An OpenAI-shaped error response: status, message, and the parameter at fault."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _param(loc: tuple) -> str:
    """pydantic's ('messages', 2, 'role') as OpenAI writes it: messages[2].role."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse_chat(body: Any) -> ChatRequest:
    try:
        chat = ChatRequest.model_validate(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = _param(first["loc"])
        raise RequestRefused(400, f"{where}: {first['msg']}" if where else first["msg"], where or None) from None
    if chat.n not in (None, 1):
        raise RequestRefused(400, f"n: only 1 choice per request is supported (decoding is greedy, so more "
                             f"would be copies), got {chat.n}", "n", "unsupported_parameter")
    for key, what in UNSUPPORTED.items():
        if (chat.model_extra or {}).get(key):
            raise RequestRefused(400, f"{key}: {what} are not supported by this model", key, "unsupported_parameter")
    return chat


def chat_messages(chat: ChatRequest) -> list[dict]:
    """The messages as the model's chat template takes them: text only, ``developer`` as ``system``."""
    messages = []
    for i, m in enumerate(chat.messages):
        content = m.content
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                if part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise RequestRefused(400, f"messages[{i}].content[{j}]: only text parts are supported, got "
                                         f"type {part.get('type')!r}", f"messages[{i}].content[{j}]")
                parts.append(part["text"])
            content = "\n".join(parts)
        messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return messages


# ---- the ASGI app ------------------------------------------------------------------------------------------
DEFAULT_MAX_TOKENS = 512  # what a request without max_tokens may be answered with (capped by the context)


class StopCutter:
    """Text pieces in, text pieces out, ending before the first stop sequence: the last few characters are
    held back until they cannot be the start of one (a stop may arrive split across pieces)."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer, self.stopped = "", False

    def feed(self, piece: str) -> str:
        if self.stopped:
            return ""
        self.buffer += piece
        cut = min((self.buffer.find(s) for s in self.stops if s in self.buffer), default=-1)
        if cut >= 0:
            self.stopped, out, self.buffer = True, self.buffer[:cut], ""
            return out
        ready = len(self.buffer) - self.hold
        out, self.buffer = (self.buffer[:ready], self.buffer[ready:]) if ready > 0 else ("", self.buffer)
        return out

    def flush(self) -> str:
        out, self.buffer = ("" if self.stopped else self.buffer), ""
        return out


def create_app(follower: AliasFollower, max_tokens: int = DEFAULT_MAX_TOKENS):
    """The Starlette app answering for whichever version ``follower`` holds at the time of each request;
    ``max_tokens``: the most a request without its own may be answered with."""
    from starlette.applications import Starlette
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from tuneloop.core.serving import ChatRefused

    def error(status: int, message: str, param: str | None = None, code: str | None = None) -> JSONResponse:
        kind = "invalid_request_error" if status < 500 else "server_error"
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)

    def unknown_model(model: str) -> JSONResponse:
        return error(404, f"The model `{model}` does not exist on this endpoint: it serves "
                     f"`{follower.name}` (the version at alias {follower.alias!r})", "model", "model_not_found")

    def no_version() -> JSONResponse:
        return error(503, f"no version of {follower.name} is loaded (alias {follower.alias!r}): see the "
                     "endpoint's log", None, "model_not_loaded")

    async def chat_completions(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            return error(400, "the request body is not valid JSON")
        try:
            chat = parse_chat(body)
            if chat.model not in follower.model_ids:
                return unknown_model(chat.model)
            served = follower.current  # this request's version, whatever the follower swaps in meanwhile
            if served is None:
                return no_version()
            messages = chat_messages(chat)
        except RequestRefused as exc:
            return error(exc.status, exc.message, exc.param, exc.code)
        asked = chat.max_completion_tokens or chat.max_tokens
        stops = [chat.stop] if isinstance(chat.stop, str) else (chat.stop or [])
        if chat.stream:
            try:
                pieces = await run_in_threadpool(served.stream, messages, asked, max_tokens)
            except ChatRefused as exc:
                return error(400, str(exc), "messages", "context_length_exceeded")
            usage = bool((chat.stream_options or {}).get("include_usage"))
            return StreamingResponse(sse_events(served, pieces, StopCutter(stops), usage), media_type="text/event-stream",
                                     headers={VERSION_HEADER: served.version, "cache-control": "no-cache"})
        try:
            answer = await run_in_threadpool(served.answer, messages, asked, max_tokens)
        except ChatRefused as exc:
            return error(400, str(exc), "messages", "context_length_exceeded")
        except TuneloopError as exc:  # an API-trained champion's service failed: already one scrubbed line
            return error(502, str(exc), None, "upstream_error")
        except Exception as exc:
            log.exception(f"{served.fingerprint} failed to answer")
            return error(500, f"{served.fingerprint} failed to answer: {type(exc).__name__}: {scrub(str(exc))}")
        cut = min((answer.text.find(s) for s in stops if s and s in answer.text), default=-1)
        if cut >= 0:  # an app that sends stop sequences must not get text past them
            answer = replace(answer, text=answer.text[:cut], finish_reason="stop")
        return JSONResponse({
            "id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": follower.name, "system_fingerprint": served.fingerprint,
            "choices": [{"index": 0, "finish_reason": answer.finish_reason, "logprobs": None,
                         "message": {"role": "assistant", "content": answer.text, "refusal": None}}],
            "usage": {"prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
                      "total_tokens": answer.prompt_tokens + answer.completion_tokens},
        }, headers={VERSION_HEADER: served.version})

    def sse_events(served: ServedVersion, pieces, cutter: StopCutter, usage: bool):
        """OpenAI's stream: a chunk with the role, one per piece of text, one with the finish reason, the usage
        chunk when asked, ``[DONE]``. A failure mid-answer ends the stream with an error event (the status
        line is already sent)."""
        import json as _json

        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk", "created": int(time.time()),
                "model": follower.name, "system_fingerprint": served.fingerprint}

        def event(delta: dict, finish: str | None = None, **extra) -> str:
            chunk = {**head, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
                     **extra}
            return f"data: {_json.dumps(chunk)}\n\n"

        yield event({"role": "assistant", "content": ""})
        final = None
        try:
            for piece in pieces:
                if not isinstance(piece, str):
                    final = piece
                elif text := cutter.feed(piece):
                    yield event({"content": text})
        except Exception as exc:  # noqa: BLE001 - the client is told, the log keeps the stack
            log.exception(f"{served.fingerprint} failed while streaming")
            yield f"data: {_json.dumps({'error': {'message': scrub(str(exc)), 'type': 'server_error'}})}\n\n"
            return
        if text := cutter.flush():
            yield event({"content": text})
        finish = "stop" if cutter.stopped else (final.finish_reason if final else "stop")
        yield event({}, finish)
        if usage and final is not None:
            yield (f"data: {_json.dumps({**head, 'choices': [], 'usage': {'prompt_tokens': final.prompt_tokens, 'completion_tokens': final.completion_tokens, 'total_tokens': final.prompt_tokens + final.completion_tokens}})}\n\n")
        yield "data: [DONE]\n\n"

    def model_card() -> dict:
        served = follower.current
        return {"id": follower.name, "object": "model", "created": served.created if served else 0,
                "owned_by": "tuneloop"}

    async def list_models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card()]})

    async def retrieve_model(request: Request) -> JSONResponse:
        model = request.path_params["model"]
        return JSONResponse(model_card()) if model in follower.model_ids else unknown_model(model)

    async def health(request: Request) -> JSONResponse:
        served = follower.current
        body = {"status": "ok" if served else "unavailable", "model": follower.name, "alias": follower.alias,
                "version": served.version if served else None}
        return JSONResponse(body, 200 if served else 503,
                            headers={VERSION_HEADER: served.version} if served else None)

    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, f"{request.method} {request.url.path}: {exc.detail} (this endpoint serves "
                     "POST /v1/chat/completions, GET /v1/models, GET /health)")

    return Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", list_models, methods=["GET"]),
        Route("/v1/models/{model:path}", retrieve_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ], exception_handlers={HTTPException: http_error})


def bind(host: str, port: int) -> socket.socket:
    """The listening socket, taken before the (slow) first load: a busy port is reported at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise TuneloopError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; another process has the port? "
                            "pick another with --port") from None
    sock.listen(2048)
    return sock


def serve_champion(tracking_uri: str, name: str, alias: str = "champion", host: str = "127.0.0.1",
                   port: int = 8000, poll_seconds: float = 5.0, max_tokens: int = DEFAULT_MAX_TOKENS) -> None:
    """``tuneloop serve-model``: listen, load the version at the alias, answer until stopped (Ctrl-C/SIGTERM),
    following the alias every ``poll_seconds``. Startup problems raise TuneloopError before anything answers."""
    import uvicorn

    from tuneloop.core.models import quiet_libraries

    sock = bind(host, port)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # the log shows what answers
    quiet_libraries()
    stop = threading.Event()
    follower_thread = None
    try:
        with tempfile.TemporaryDirectory(prefix="tuneloop-endpoint-") as work:
            try:
                follower = AliasFollower(tracking_uri, name, alias, Path(work))
                follower.start()
                follower_thread = threading.Thread(target=follower.follow, args=(poll_seconds, stop), daemon=True,
                                                   name="tuneloop-alias-follower")
                follower_thread.start()
                shown = f"[{host}]" if ":" in host else host
                log.info(f"OpenAI-compatible API on http://{shown}:{sock.getsockname()[1]}/v1 (model {name!r}; "
                         f"following @{alias} every {poll_seconds:g}s)")
                config = uvicorn.Config(create_app(follower, max_tokens), log_level="warning", lifespan="off",
                                        timeout_graceful_shutdown=10)
                uvicorn.Server(config).run(sockets=[sock])
            finally:
                stop.set()
                if follower_thread is not None:  # a load under way finishes before its folder is removed
                    follower_thread.join(timeout=10)
    finally:
        sock.close()
