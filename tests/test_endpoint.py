"""`tuneloop serve-model`: the champion behind an OpenAI-compatible API, called with the real openai SDK.

Two versions of a tiny local model are registered in a real MLflow registry: v1 an untrained LoRA adapter (it
answers like the base), v2 the same adapter with nonzero lora_B (it answers differently). The endpoint runs as
the real command in its own process and follows the alias without a restart."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from conftest import DEMO, ROOT

NAME = "support-bot"
SYSTEM = "Route the ticket to a queue and write the first reply."
TICKET = "Subject: Card declined on renewal\n\nHi there, I need the VAT number added to invoice INV-58810."
MAX_NEW_TOKENS = 10


def register_version(client, experiment: str, pyfunc_dir: Path) -> str:
    """As tasks/register.py did before versions pointed at logged models: the pyfunc as a run's ``model``
    artifact, a version pointing at it (registries hold such versions; they are served all the same)."""
    run = client.create_run(experiment)
    client.log_artifacts(run.info.run_id, str(pyfunc_dir), "model")
    client.set_terminated(run.info.run_id)
    return str(client.create_model_version(NAME, source=f"{run.info.artifact_uri}/model", run_id=run.info.run_id).version)


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """(tracking URI, pyfunc folders by version) with v1 champion."""
    import torch
    from mlflow import MlflowClient
    from peft import LoraConfig, get_peft_model

    from tuneloop.core.config import TinyBaseConfig
    from tuneloop.core.models import load_causal_lm, load_tokenizer
    from tuneloop.core.serving import save_champion_model
    from tuneloop.lib.base_model import build_tiny_model

    root = tmp_path_factory.mktemp("endpoint")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join((DEMO / "tickets.jsonl").read_text().splitlines(True)[:300]))
    base = build_tiny_model(TinyBaseConfig(corpus=[corpus], vocab_size=300, hidden_size=32, num_layers=1,
                                           num_heads=2), root / "base")
    tokenizer = load_tokenizer(base)
    lora = get_peft_model(load_causal_lm(base), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                           task_type="CAUSAL_LM"))
    pyfuncs = {}
    for version in ("1", "2"):
        if version == "2":  # an untrained LoRA has lora_B = 0 (the base's answers); nonzero B changes them
            torch.manual_seed(0)
            with torch.no_grad():
                for key, weight in lora.named_parameters():
                    if "lora_B" in key:
                        weight.normal_(0, 2.0)
        adapter = root / f"adapter{version}"
        lora.save_pretrained(adapter)
        tokenizer.save_pretrained(adapter)
        pyfuncs[version] = save_champion_model(root / f"pyfunc{version}" / "model", "local", str(base), adapter, None,
                                               {}, SYSTEM, MAX_NEW_TOKENS)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("endpoint", artifact_location=(root / "artifacts").as_uri())
    client.create_registered_model(NAME)
    assert [register_version(client, experiment, pyfuncs[v]) for v in ("1", "2")] == ["1", "2"]
    client.set_registered_model_alias(NAME, "champion", "1")
    return uri, pyfuncs, root


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_model(uri: str, home: Path, *args: str, stderr=subprocess.PIPE) -> subprocess.Popen:
    env = {**os.environ, "TUNELOOP_HOME": str(home), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "tuneloop.app.cli", "serve-model", "--set", f"register.model_name={NAME}",
                             "--set", f"register.tracking_uri={uri}", *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE if stderr == subprocess.PIPE else stderr,
                            stderr=stderr, text=True)


def wait_healthy(port: int, proc: subprocess.Popen, log: Path, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as reply:
                return json.loads(reply.read())
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"the endpoint did not come up: {log.read_text()}")


@pytest.mark.slow
def test_the_champion_answers_through_the_openai_sdk_and_a_promotion_is_served_without_a_restart(registry, tmp_path):
    import mlflow.pyfunc
    from mlflow import MlflowClient

    uri, pyfuncs, root = registry
    port = free_port()
    log = tmp_path / "endpoint.log"
    with log.open("w") as err:
        proc = serve_model(uri, tmp_path / "home", "--port", str(port), "--poll-seconds", "0.3", stderr=err)
    try:
        # while the endpoint starts: each version's own answer, through its pyfunc as any MLflow service loads it
        v1, v2 = (mlflow.pyfunc.load_model(str(pyfuncs[v])) for v in ("1", "2"))
        own = {"1": v1.predict([TICKET])[0], "2": v2.predict([TICKET])[0]}
        assert own["1"] != own["2"]  # the two versions really answer differently
        terse = [{"role": "developer", "content": [{"type": "text", "text": "Answer in one word."}]},
                 {"role": "user", "content": TICKET}]
        terse_v1 = v1.unwrap_python_model().answer_chat([{"role": "system", "content": "Answer in one word."},
                                                         {"role": "user", "content": TICKET}], 6)

        assert wait_healthy(port, proc, log) == {"status": "ok", "model": NAME, "alias": "champion", "version": "1"}
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list()] == [NAME]

        ticket = [{"role": "user", "content": TICKET}]
        raw = client.chat.completions.with_raw_response.create(model=NAME, messages=ticket, max_tokens=MAX_NEW_TOKENS)
        reply = raw.parse()
        assert raw.headers["x-tuneloop-model-version"] == "1"
        assert reply.system_fingerprint == f"{NAME}@champion:v1" and reply.model == NAME
        assert reply.choices[0].message.content == own["1"] and reply.choices[0].message.role == "assistant"
        usage = reply.usage
        assert usage.prompt_tokens > 0 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert 0 < usage.completion_tokens <= MAX_NEW_TOKENS  # the budget the version was evaluated with
        assert reply.choices[0].finish_reason == ("length" if usage.completion_tokens == MAX_NEW_TOKENS else "stop")
        # no max_tokens: the server's default (512, capped by the context left), not the evaluation budget
        long = client.chat.completions.create(model=NAME, messages=ticket)
        direct = v1.unwrap_python_model().answer_chat([{"role": "system", "content": SYSTEM}, *ticket], None, 512)
        assert long.choices[0].message.content == direct.text and long.usage.completion_tokens == direct.completion_tokens
        assert long.usage.completion_tokens > MAX_NEW_TOKENS and long.choices[0].message.content.startswith(own["1"])

        # stream=True: OpenAI's server-sent events, read by the SDK; the same answer, piece by piece
        chunks = list(client.chat.completions.create(model=NAME, messages=ticket, max_tokens=MAX_NEW_TOKENS,
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].object == "chat.completion.chunk"
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == own["1"]
        assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # in pieces, not one blob
        assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
            reply.choices[0].finish_reason]
        assert chunks[-1].usage.completion_tokens == usage.completion_tokens and chunks[-1].choices == []
        assert {c.system_fingerprint for c in chunks} == {f"{NAME}@champion:v1"}
        stop = own["1"][4:6]  # a stop sequence inside the answer: the stream ends before it, as OpenAI's does
        stopped = client.chat.completions.create(model=NAME, messages=ticket, max_tokens=MAX_NEW_TOKENS, stream=True,
                                                 stop=[stop])
        assert "".join(c.choices[0].delta.content or "" for c in stopped) == own["1"][:own["1"].find(stop)]
        cut = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": TICKET}], max_tokens=1)
        assert (cut.usage.completion_tokens, cut.choices[0].finish_reason) == (1, "length")
        assert cut.usage.prompt_tokens == usage.prompt_tokens

        # the request's own system prompt replaces the model's; text parts are joined; sampling knobs are ignored
        mine = client.chat.completions.create(model=f"{NAME}@champion", messages=terse, max_completion_tokens=6,
                                              temperature=1.3, top_p=0.5)
        assert mine.choices[0].message.content == terse_v1.text
        assert (mine.usage.prompt_tokens, mine.usage.completion_tokens) == (terse_v1.prompt_tokens,
                                                                          terse_v1.completion_tokens)
        assert mine.usage.prompt_tokens != reply.usage.prompt_tokens
        assert mine.choices[0].finish_reason == terse_v1.finish_reason

        with pytest.raises(openai.BadRequestError, match="maximum context length is 512 tokens") as refused:
            client.chat.completions.create(model=NAME, messages=ticket, max_tokens=600, stream=True)
        assert refused.value.status_code == 400  # refused before the first event, as a whole answer would be
        with pytest.raises(openai.NotFoundError, match="The model `gpt-4o-mini` does not exist") as unknown:
            client.chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": TICKET}])
        assert unknown.value.body["code"] == "model_not_found"
        with pytest.raises(openai.BadRequestError, match=r"n: only 1 choice"):
            client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": TICKET}], n=2)
        with pytest.raises(openai.BadRequestError, match=r"messages\[0\]\.role"):
            client.chat.completions.create(model=NAME, messages=[{"role": "tool", "content": "x", "tool_call_id": "1"}])
        with pytest.raises(openai.BadRequestError, match="maximum context length is 512 tokens"):
            client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": TICKET}], max_tokens=600)

        # a promotion: the same process answers with v2 within a few polls
        registry_client = MlflowClient(uri)
        registry_client.set_registered_model_alias(NAME, "champion", "2")
        deadline = time.monotonic() + 30
        while True:
            raw = client.chat.completions.with_raw_response.create(model=NAME, messages=ticket,
                                                                   max_tokens=MAX_NEW_TOKENS)
            if raw.headers["x-tuneloop-model-version"] == "2" or time.monotonic() > deadline:
                break
            assert raw.parse().choices[0].message.content == own["1"]  # until the swap, v1 answers whole
            time.sleep(0.2)
        reply = raw.parse()
        assert reply.system_fingerprint == f"{NAME}@champion:v2" and reply.choices[0].message.content == own["2"]

        # a version that cannot be loaded: the old one keeps answering, the log says why
        broken = root / "broken"
        broken.mkdir(exist_ok=True)
        registry_client.create_model_version(NAME, source=str(broken))
        registry_client.set_registered_model_alias(NAME, "champion", "3")
        deadline = time.monotonic() + 30
        while "v3 (@champion) failed to load, still serving v2" not in log.read_text() and time.monotonic() < deadline:
            time.sleep(0.2)
        raw = client.chat.completions.with_raw_response.create(model=NAME, messages=ticket, max_tokens=MAX_NEW_TOKENS)
        assert raw.headers["x-tuneloop-model-version"] == "2" and raw.parse().choices[0].message.content == own["2"]
        assert proc.poll() is None  # never restarted
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    text = log.read_text()
    assert f"serving {NAME} v1 (@champion)" in text and f"serving {NAME} v2 (@champion, was v1)" in text
    assert "v3 (@champion) failed to load, still serving v2" in text and "Traceback" not in text
    assert proc.returncode == 0 and "endpoint stopped" in text


@pytest.mark.slow
def test_startup_problems_are_one_line_and_exit_1(registry, tmp_path):
    from tuneloop.app.endpoint import AliasFollower
    from tuneloop.core.records import TuneloopError

    uri, _, _ = registry
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = str(taken.getsockname()[1])
        runs = [serve_model(uri, tmp_path / "home", "--alias", "staging", "--port", str(free_port())),
                serve_model(uri, tmp_path / "home", "--port", port)]
        results = [run.communicate(timeout=120) + (run.returncode,) for run in runs]
    for _, stderr, code in results:
        assert code == 1 and "Traceback" not in stderr, stderr
        assert len([line for line in stderr.splitlines() if line.startswith("error:")]) == 1, stderr
    assert "has no version at alias 'staging' yet (versions: 1, 2" in results[0][1]
    assert "tuneloop promote VERSION" in results[0][1]
    assert f"cannot listen on 127.0.0.1:{port}" in results[1][1] and "--port" in results[1][1]
    with pytest.raises(TuneloopError, match=r"no registered model 'other-bot' at .*`tuneloop run` trains"):
        AliasFollower(uri, "other-bot", "champion", tmp_path).start()


def test_an_endpoint_with_nothing_loaded_answers_503_and_health_says_so(tmp_path):
    import threading

    import uvicorn

    from tuneloop.app.endpoint import AliasFollower, bind, create_app

    follower = AliasFollower(f"sqlite:///{tmp_path / 'mlflow.db'}", NAME, "champion", tmp_path)  # nothing loaded
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(follower), log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        port = sock.getsockname()[1]
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="x", max_retries=0)
        deadline = time.monotonic() + 10
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(openai.InternalServerError, match="no version of support-bot is loaded") as unavailable:
            client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": TICKET}])
        assert unavailable.value.status_code == 503
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
        assert health.value.code == 503 and json.loads(health.value.read())["status"] == "unavailable"
        with pytest.raises(openai.NotFoundError, match="this endpoint serves POST /v1/chat/completions"):
            client.completions.create(model=NAME, prompt="hi")
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


def test_an_api_trained_champion_answers_whole_chats_with_the_services_usage(tmp_path, monkeypatch):
    """The OpenAI/Azure backend's pyfunc: the chat as sent (its own system message, else the model's)."""
    import mlflow.pyfunc
    from fake_openai import FakeOpenAI

    from tuneloop.core.serving import save_champion_model

    monkeypatch.setenv("ENDPOINT_TEST_KEY", "sk-endpoint-0123456789")
    seen = []
    with FakeOpenAI(answer=lambda model, messages: seen.append((model, messages)) or "queue: billing") as fake:
        saved = save_champion_model(tmp_path / "model", "openai", "gpt-4o-mini-2024-07-18", None, "ft:gpt-4o-mini:acme::1",
                                    {"provider": "compatible", "base_url": fake.base_url,
                                     "api_key_env": "ENDPOINT_TEST_KEY"}, SYSTEM, 7)
        champion = mlflow.pyfunc.load_model(str(saved)).unwrap_python_model()
        answer = champion.answer_chat([{"role": "user", "content": TICKET}])
        own = champion.answer_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": TICKET}], 3)
    assert (answer.text, answer.prompt_tokens, answer.completion_tokens, answer.finish_reason) == (
        "queue: billing", 1, 1, "stop")
    assert seen[0] == ("ft:gpt-4o-mini:acme::1", [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TICKET}])
    assert seen[1][1] == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TICKET}]
    sent = [json.loads(body) for method, path, _, body in fake.requests if path.endswith("/chat/completions")]
    assert [r["max_tokens"] for r in sent] == [7, 3] and all(r["temperature"] == 0 for r in sent)
    assert own.text == "queue: billing"
