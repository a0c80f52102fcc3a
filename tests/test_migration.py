"""Off the closing road, end to end: an OpenAI fine-tune is the champion (trained through the real SDK against
the fake server), then `--migrate` moves it to a local model: the API model answers the records that come
without an answer, a local candidate learns from them, is scored against the API champion on the same
held-out examples and takes over; the registered champion then answers locally with no key."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from fake_openai import FakeOpenAI
from openai import OpenAI
from test_endpoint import free_port, wait_healthy

from conftest import DEMO, DEMO_CONFIG, write_lines

KEY = "sk-test-MIGRATE-0123456789abcdef"
REPLY = "Thanks, we are looking into it."


def api_answer(model: str, messages: list[dict]) -> str:
    """The fine-tune escalates every ticket (a queue the held-out set never expects: a champion any local model
    is at least as good as, so the test does not hang on how well a tiny model learns in 40 steps; the tie rule
    itself is tested in test_distill.py); the base model says nothing useful."""
    return f"queue: escalations\n{REPLY}" if model.startswith("ft:") else "Hello! How can I help?"


@pytest.mark.slow
def test_an_openai_champion_is_migrated_to_a_local_model_that_answers_without_a_key(
        prefect_harness, home, tmp_path, monkeypatch):
    import mlflow.pyfunc
    from mlflow import MlflowClient

    from tuneloop.core.config import load_config
    from tuneloop.flows.retrain import retrain
    from tuneloop.lib.registry import ModelRegistry

    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    tickets = []
    for line in (DEMO / "tickets.jsonl").read_text().splitlines():  # the demo's good tickets
        try:
            ticket = json.loads(line)
        except json.JSONDecodeError:
            continue
        if all(isinstance(ticket.get(k), str) and ticket[k].strip() for k in ("subject", "body", "queue", "answer")):
            tickets.append(ticket)
    landing = home / "landing"
    write_lines(landing / "labelled.jsonl", [json.dumps(t) for t in tickets[:240]])
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with FakeOpenAI(answer=api_answer) as fake:
        fake.valid_key = KEY
        overrides = [
            f"train.openai.base_url={fake.base_url}", "train.openai.provider=compatible",
            "train.openai.poll_seconds=0.01",
            "evaluate.max_examples=30", f"register.tracking_uri={uri}", "train.max_cost_usd=5",
            "train.local.max_steps=40"]
        first = retrain(load_config(DEMO_CONFIG, ["train.backend=openai", *overrides]))
        assert first.model_version.version == "1" and first.report.candidate.accuracy == 0.0

        ModelRegistry(uri, first.model_version.name).promote("1", "test", "the API fine-tune in production")
        api_champion_accuracy = 0.0

        # new tickets arrive without queue or answer: the API model used to write them
        unlabelled = [{k: v for k, v in t.items() if k not in ("queue", "answer")} for t in tickets[240:300]]
        write_lines(landing / "unlabelled.jsonl", [json.dumps(t) for t in unlabelled])
        before = len([r for r in fake.requests if r[1].endswith("/chat/completions")])
        moved = retrain(load_config(DEMO_CONFIG, overrides), migrate=True)
        calls = [json.loads(r[3]) for r in fake.requests[:] if r[1].endswith("/chat/completions")][before:]
        taught = moved.distilled
        assert (taught.n_to_answer, taught.n_answered, taught.n_called, taught.n_cached) == (60, 60, 60, 0)
        assert taught.estimated_cost_usd > 0 and taught.teacher.startswith("champion v1 (ft:gpt-4o-mini")
        # 60 teacher answers (at distill.max_new_tokens); the API champion also answers the held-out examples,
        # the local candidate and base answer here
        assert len([c for c in calls if c["model"].startswith("ft:") and c["max_tokens"] == 256]) == 60
        assert {c["model"] for c in calls} == {"ft:gpt-4o-mini-2024-07-18:fake::ftjob-1"}
        assert (moved.n_read, moved.n_accepted, moved.n_quarantined) == (60, 60, 0)

        report, mv = moved.report, moved.model_version
        assert report.champion_version == "1" and report.champion.accuracy == pytest.approx(api_champion_accuracy)
        assert report.n_examples == 30  # the same held-out examples for both
        assert mv.decision.promoted, mv.decision.reason
        assert mv.version == "2" and "champion" in mv.aliases
        client = MlflowClient(uri)
        assert client.get_model_version(mv.name, "2").tags["backend"] == "local"
        run = client.get_run(mv.run_id)
        assert run.data.metrics["teacher/answered"] == 60 and run.data.metrics["teacher/asked"] == 60
        assert run.data.metrics["teacher/estimated_cost_usd"] == taught.estimated_cost_usd
        assert [a.path for a in client.list_artifacts(mv.run_id, "teacher")] == ["teacher/teacher_answers.jsonl"]
        snapshot = home / "datasets" / f"{moved.dataset_version}.jsonl"
        sources = [json.loads(line).get("answered_by") for line in snapshot.read_text().splitlines()]
        assert sources.count("champion v1 (ft:gpt-4o-mini-2024-07-18:fake::ftjob-1)") == 60
        assert sources.count(None) == len(sources) - 60

        # the same run again: nothing new, the teacher is not asked again
        n = len(fake.requests)
        again = retrain(load_config(DEMO_CONFIG, overrides), migrate=True)
        assert again.status == "nothing_new" and len(fake.requests) == n

        # the champion now answers here, with no key and no call to the API
        monkeypatch.delenv("OPENAI_API_KEY")
        n = len(fake.requests)
        held = json.loads((DEMO / "holdout.jsonl").read_text().splitlines()[0])
        answer = mlflow.pyfunc.load_model(f"models:/{mv.name}@champion").predict(
            [f"Subject: {held['subject']}\n\n{held['body']}"])
        assert answer[0].startswith("queue:") and len(fake.requests) == n

        # apps keep the OpenAI SDK and change the base URL: the endpoint serves the local champion, then (rolled
        # back to the API fine-tune, say while an issue is looked at) the API champion, with no restart
        port = free_port()
        log = tmp_path / "endpoint.log"
        env = {**os.environ, "TUNELOOP_HOME": str(home), "OPENAI_API_KEY": KEY, "OMP_NUM_THREADS": "1"}
        with log.open("w") as err:
            proc = subprocess.Popen([sys.executable, "-m", "tuneloop.app.cli", "serve-model", "--set",
                                     f"register.tracking_uri={uri}", "--port", str(port), "--poll-seconds", "0.3"],
                                    env=env, stdout=err, stderr=err)
        try:
            assert wait_healthy(port, proc, log)["version"] == "2"
            app = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
            question = [{"role": "user", "content": f"Subject: {held['subject']}\n\n{held['body']}"}]
            raw = app.chat.completions.with_raw_response.create(model=mv.name, messages=question)
            assert raw.headers["x-tuneloop-model-version"] == "2" and raw.parse().choices[0].message.content == answer[0]
            assert len(fake.requests) == n  # answered here
            ModelRegistry(uri, mv.name).rollback("test", "compare with the API model")
            deadline = time.monotonic() + 60
            while raw.headers["x-tuneloop-model-version"] != "1" and time.monotonic() < deadline:
                time.sleep(0.3)
                raw = app.chat.completions.with_raw_response.create(model=mv.name, messages=question)
            assert raw.headers["x-tuneloop-model-version"] == "1"
            assert raw.parse().choices[0].message.content == f"queue: escalations\n{REPLY}"
            assert proc.poll() is None
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=30)
        assert KEY not in log.read_text()
