"""The OpenAI backend through the real ``openai`` SDK against a fake server on 127.0.0.1 (tests/fake_openai.py)."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from fake_openai import FakeOpenAI, Fault, Lifecycle, exported_files

from conftest import ROOT
from tuneloop.core.config import TrainConfig
from tuneloop.core.records import TuneloopError
from tuneloop.tasks.train_openai import train_openai

KEY = "sk-test-PLANTED-0123456789abcdef"


def config(fake: FakeOpenAI, **openai) -> TrainConfig:
    return TrainConfig.model_validate({"backend": "local", "openai": {
        "provider": "compatible", "base_url": fake.base_url, "poll_seconds": 0.01, "request_retries": 3, **openai}})


@pytest.fixture
def key(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    return KEY


def test_success_uploads_once_creates_one_job_streams_metrics_and_a_rerun_reattaches(tmp_path, key):
    exported = exported_files(tmp_path)
    with FakeOpenAI() as fake:
        metrics = []
        trained = train_openai(exported, config(fake), tmp_path / "home", tmp_path / "run", "flow-1", "cfg",
                               on_metrics=lambda step, values: metrics.append((step, values)), sleep=lambda s: None)
        assert trained.backend == "openai" and trained.fine_tuned_model == "ft:gpt-4o-mini-2024-07-18:fake::ftjob-1"
        assert trained.job_id == "ftjob-1" and trained.trained_tokens == 1234
        assert [s for s, _ in metrics] == [1, 2, 3, 4] and set(metrics[0][1]) == {
            "train_loss", "valid_loss", "train_mean_token_accuracy"}
        assert trained.loss_history[-1] == (4, 0.25)
        assert (tmp_path / "run" / "step_metrics.csv").read_text().startswith("step,train_loss")
        assert len(json.loads((tmp_path / "run" / "checkpoints.json").read_text())) == 2
        job = fake.jobs["ftjob-1"]
        assert job["metadata"]["dataset_version"] == "v1" and job["metadata"]["flow_run_id"] == "flow-1"
        assert job["method"]["supervised"]["hyperparameters"] == {
            "n_epochs": "auto", "batch_size": "auto", "learning_rate_multiplier": "auto"}
        assert job["validation_file"] == "file-2" and len(fake.files) == 3  # two uploads + the result file

        again = train_openai(exported, config(fake), tmp_path / "home", tmp_path / "run2", sleep=lambda s: None)
        assert again.job_id == "ftjob-1" and len(fake.jobs) == 1 and len(fake.files) == 3


def test_a_failed_job_fails_with_code_message_and_param_and_error_while_running_is_no_failure(tmp_path, key):
    lifecycle = Lifecycle(statuses=["validating_files", "running", "running", "failed"],
                          error={"code": "invalid_training_file", "message": "line 3: no assistant message",
                                 "param": "training_file"})
    with FakeOpenAI(lifecycle) as fake:
        with pytest.raises(TuneloopError) as err:
            train_openai(exported_files(tmp_path), config(fake), tmp_path / "home", tmp_path / "run", sleep=lambda s: None)
        assert str(err.value) == ("openai: fine-tuning job ftjob-1 failed: invalid_training_file: "
                                  "line 3: no assistant message (param training_file)")
        assert fake.polls["ftjob-1"] == 3  # polled past two "running" answers that carried error: {}


def test_a_500_after_the_job_was_created_still_ends_with_exactly_one_job(tmp_path, key):
    with FakeOpenAI() as fake:
        fake.faults.append(Fault("POST", "/v1/fine_tuning/jobs", 500, after_effect=True))
        trained = train_openai(exported_files(tmp_path), config(fake), tmp_path / "home", tmp_path / "run",
                               sleep=lambda s: None)
        assert len(fake.jobs) == 1 and trained.job_id == "ftjob-1"
        creates = [r for r in fake.requests if r[0] == "POST" and r[1].startswith("/v1/fine_tuning/jobs")]
        assert len(creates) == 1  # the SDK did not retry the POST on its own


def test_429_honours_retry_after_and_a_dropped_connection_while_polling_is_retried(tmp_path, key):
    sleeps = []
    with FakeOpenAI() as fake:
        fake.faults.append(Fault("POST", "/v1/fine_tuning/jobs", 429, headers={"retry-after": "7"}))
        fake.faults.append(Fault("GET", "/v1/fine_tuning/jobs/ftjob-1", 0))  # connection dropped
        trained = train_openai(exported_files(tmp_path), config(fake), tmp_path / "home", tmp_path / "run",
                               sleep=sleeps.append)
        assert 7.0 in sleeps and trained.fine_tuned_model and len(fake.jobs) == 1


def test_401_fails_at_once_with_advice_and_never_shows_the_key(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-wrong-SECRET-abcdef0123456789")
    with FakeOpenAI() as fake:
        fake.valid_key = KEY
        with pytest.raises(TuneloopError) as err:
            train_openai(exported_files(tmp_path), config(fake), tmp_path / "home", tmp_path / "run", sleep=lambda s: None)
        message = str(err.value)
        assert "HTTP 401 invalid_api_key" in message and "OPENAI_API_KEY" in message and "fine-tuning" in message
        assert "SECRET" not in message
        assert sum(r[0] == "GET" for r in fake.requests) == 1  # no retries on 401


def test_missing_key_and_missing_endpoints_are_config_errors(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(TuneloopError, match="set the environment variable OPENAI_API_KEY"):
        train_openai(exported_files(tmp_path), TrainConfig(), tmp_path, tmp_path / "run")
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("AZURE_OPENAI_ENDPOINT", raising=False)
    with pytest.raises(TuneloopError, match="azure_endpoint"):
        train_openai(exported_files(tmp_path), TrainConfig.model_validate({"openai": {"provider": "azure"}}),
                     tmp_path, tmp_path / "run")


def test_azure_provider_goes_through_azure_openai_client(tmp_path, key):
    with FakeOpenAI() as fake:
        cfg = TrainConfig.model_validate({"openai": {"provider": "azure", "azure_endpoint": fake.base_url[:-3],
                                                     "poll_seconds": 0.01}})
        trained = train_openai(exported_files(tmp_path), cfg, tmp_path / "home", tmp_path / "run", sleep=lambda s: None)
        assert trained.fine_tuned_model
        assert all(r[1].startswith("/openai/") and "api-version=" in r[1] for r in fake.requests)
        assert all(r[2].get("api-key") == KEY for r in fake.requests)


CHILD = """
import os, sys, time
sys.path.insert(0, {root!r}); sys.path.insert(0, {tests!r})
from fake_openai import exported_files  # not the test module: its conftest import clears OPENAI_API_KEY
from tuneloop.core.config import TrainConfig
from pathlib import Path
from tuneloop.tasks.train_openai import train_openai
tmp = Path({tmp!r})
cfg = TrainConfig.model_validate({{"openai": {{"provider": "compatible", "base_url": {url!r}, "poll_seconds": 0.2}}}})
train_openai(exported_files(tmp), cfg, tmp / "home", tmp / "run")
"""


def test_a_process_killed_mid_poll_is_reattached_not_recreated(tmp_path, key):
    lifecycle = Lifecycle(statuses=["validating_files"] + ["running"] * 30 + ["succeeded"])
    with FakeOpenAI(lifecycle) as fake:
        code = CHILD.format(root=str(ROOT), tests=str(ROOT / "tests"), tmp=str(tmp_path), url=fake.base_url)
        child = subprocess.Popen([sys.executable, "-c", code], env={**os.environ}, start_new_session=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and fake.polls.get("ftjob-1", 0) < 2:
            time.sleep(0.05)
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        assert fake.polls.get("ftjob-1", 0) >= 2 and fake.jobs["ftjob-1"]["status"] == "running"
        n_requests = len(fake.files)
        trained = train_openai(exported_files(tmp_path), config(fake), tmp_path / "home", tmp_path / "run",
                               sleep=lambda s: None)
        assert trained.job_id == "ftjob-1" and len(fake.jobs) == 1 and len(fake.files) == n_requests + 1


def heldout_answer():
    """The fake's chat model: a fine-tuned model routes held-out tickets right, the base model does not."""
    from conftest import DEMO

    labels = {}
    for line in (DEMO / "holdout.jsonl").read_text().splitlines():
        row = json.loads(line)
        labels[f"Subject: {row['subject']}\n\n{row['body']}"] = row["queue"]
    return lambda model, messages: (f"queue: {labels.get(messages[-1]['content'], 'billing')}\nThanks!"
                                    if model.startswith("ft:") else "Hello! How can I help?")


@pytest.mark.slow
def test_the_whole_flow_on_the_openai_backend_and_the_key_is_nowhere(prefect_harness, home, tmp_path, key):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    from conftest import DEMO, DEMO_CONFIG
    from tuneloop.core.config import load_config
    from tuneloop.flows.retrain import retrain

    landing = home / "landing"
    landing.mkdir(parents=True)
    (landing / "t.jsonl").write_text("".join((DEMO / "tickets.jsonl").read_text().splitlines(True)[:300]))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with FakeOpenAI(answer=heldout_answer()) as fake:
        fake.valid_key = KEY
        cfg = load_config(DEMO_CONFIG, [
            "train.backend=openai", f"train.openai.base_url={fake.base_url}", "train.openai.provider=compatible",
            "train.openai.poll_seconds=0.01",
            "evaluate.max_examples=40", f"register.tracking_uri={uri}", "train.max_cost_usd=50"])
        result = retrain(cfg)
        assert len(fake.jobs) == 1 and result.model_version.decision.promoted
        assert result.report.candidate.accuracy == 1.0 and result.report.base.accuracy == 0.0
        completions = [r for r in fake.requests if r[1].endswith("/chat/completions")]
        assert len(completions) == 80  # base + candidate on 40 held-out examples

        client = MlflowClient(uri)
        run = client.get_run(result.model_version.run_id)
        assert [m.step for m in client.get_metric_history(run.info.run_id, "loss/valid")] == [1, 2, 3, 4]
        assert run.data.metrics["train/trained_tokens"] == 1234 and run.data.metrics["tokens/estimated_cost_usd"] > 0
        version = client.get_model_version(result.model_version.name, result.model_version.version)
        assert version.tags["fine_tuned_model"] == "ft:gpt-4o-mini-2024-07-18:fake::ftjob-1"
        assert version.tags["openai_job_id"] == "ftjob-1" and version.source.startswith("models:/m-")  # a logged model
        assert {a.path for a in client.list_artifacts(run.info.run_id, "openai")} >= {
            "openai/step_metrics.csv", "openai/checkpoints.json", "openai/openai_job.json"}

        # the champion is an API model: next time it is re-scored through chat.completions
        from tuneloop.lib.registry import ModelRegistry

        champ = ModelRegistry(uri, cfg.registry.model_name).download_champion(tmp_path / "champ")
        assert champ.backend == "openai" and champ.fine_tuned_model == version.tags["fine_tuned_model"]
        import mlflow.pyfunc

        loaded = mlflow.pyfunc.load_model(f"models:/{result.model_version.name}@champion")
        held = json.loads((DEMO / "holdout.jsonl").read_text().splitlines()[0])
        assert loaded.predict([f"Subject: {held['subject']}\n\n{held['body']}"]) == [f"queue: {held['queue']}\nThanks!"]
        assert fake.requests[-1][1].endswith("/chat/completions")

        # the key appears in no file, MLflow param or tag, or Prefect log of the run
        everything = [p.read_bytes() for p in home.rglob("*") if p.is_file()]
        everything += [p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".db"]
        assert not any(KEY.encode() in blob for blob in everything)
        assert KEY not in json.dumps([run.data.params, run.data.tags, version.tags])
        async def logs():
            async with get_client() as c:
                return await c.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(
                    any_=[__import__("uuid").UUID(run.data.tags["prefect_flow_run_id"])])))
        import asyncio

        messages = [log.message for log in asyncio.run(logs())]
        assert any("openai ftjob-1: Step 4" in m for m in messages)
        assert not any(KEY in m for m in messages)


@pytest.mark.slow
def test_over_budget_nothing_is_uploaded(prefect_harness, home, tmp_path, key):
    from conftest import DEMO, DEMO_CONFIG
    from tuneloop.core.config import load_config
    from tuneloop.flows.retrain import retrain

    landing = home / "landing"
    landing.mkdir(parents=True)
    (landing / "t.jsonl").write_text("".join((DEMO / "tickets.jsonl").read_text().splitlines(True)[:300]))
    with FakeOpenAI() as fake:
        cfg = load_config(DEMO_CONFIG, [
            "train.backend=openai", f"train.openai.base_url={fake.base_url}", "train.openai.provider=compatible",
            "train.max_cost_usd=0.001",
            f"register.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
        with pytest.raises(TuneloopError, match=r"exceeds train.max_cost_usd \$0.00 .* nothing was uploaded"):
            retrain(cfg)
        assert fake.files == {} and fake.jobs == {}


def test_cancelling_the_flow_run_cancels_its_job(tmp_path, key):
    from types import SimpleNamespace

    from conftest import DEMO_CONFIG
    from tuneloop.core.config import load_config
    from tuneloop.flows.retrain import cancel_openai_jobs

    lifecycle = Lifecycle(statuses=["validating_files"] + ["running"] * 50)
    with FakeOpenAI(lifecycle) as fake:
        cfg = load_config(DEMO_CONFIG, ["train.backend=openai", f"train.openai.base_url={fake.base_url}",
                                        "train.openai.provider=compatible"])
        fake.create_job({"model": "m", "training_file": None, "metadata": {"flow_run_id": "run-A"}})
        fake.create_job({"model": "m", "training_file": None, "metadata": {"flow_run_id": "run-B"}})
        cancel_openai_jobs(None, SimpleNamespace(id="run-A", parameters={"config": cfg.model_dump(by_alias=True)}), None)
        assert fake.jobs["ftjob-1"]["status"] == "cancelled" and fake.jobs["ftjob-2"]["status"] == "validating_files"


@pytest.mark.slow
def test_tuneloop_run_with_openai_base_url_from_the_environment(tmp_path):
    from conftest import DEMO

    home = tmp_path / "home"
    (home / "landing").mkdir(parents=True)
    (home / "landing" / "t.jsonl").write_text("".join((DEMO / "tickets.jsonl").read_text().splitlines(True)[:200]))
    with FakeOpenAI(answer=heldout_answer()) as fake:
        env = {"TUNELOOP_HOME": str(home), "PATH": "", "DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1",
               "OPENAI_BASE_URL": fake.base_url, "OPENAI_API_KEY": KEY, "PREFECT_HOME": str(tmp_path / "prefect")}
        out = subprocess.run([sys.executable, "-m", "tuneloop.app.cli", "run", "--set", "train.backend=openai",
                              "--set", "train.openai.poll_seconds=0.01", "--set", "evaluate.max_examples=20"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        assert "Registered lumenfold-support version 1 with alias champion" in out.stdout
        assert len(fake.jobs) == 1 and KEY not in out.stdout + out.stderr


def test_paused_is_waited_on_then_given_up_after_the_limit(tmp_path, key):
    with FakeOpenAI(Lifecycle(statuses=["queued", "paused", "paused", "running", "succeeded"])) as fake:
        trained = train_openai(exported_files(tmp_path), config(fake), tmp_path / "home", tmp_path / "run",
                               sleep=lambda s: None)
        assert trained.fine_tuned_model  # a pause that ends is waited out
    with FakeOpenAI(Lifecycle(statuses=["queued"] + ["paused"] * 100)) as fake:
        from tuneloop.core.openai_client import Secrets, make_client
        from tuneloop.tasks.train_openai import poll_job

        cfg = config(fake, max_paused_seconds=30).openai
        client = make_client(cfg)
        job = client.fine_tuning.jobs.create(model="m", training_file=None)
        ticks = iter(range(0, 10_000, 10))  # each poll is 10 s later
        with pytest.raises(TuneloopError, match="paused for over 30s .*rerun to reattach"):
            poll_job(client, job, cfg, Secrets(KEY), sleep=lambda s: None, clock=lambda: next(ticks))


def test_a_reused_upload_that_no_longer_exists_is_uploaded_again(tmp_path, key):
    exported = exported_files(tmp_path)
    with FakeOpenAI() as fake:
        train_openai(exported, config(fake), tmp_path / "home", tmp_path / "run", sleep=lambda s: None)
        fake.jobs["ftjob-1"]["status"] = "cancelled"  # so a new job must be created
        del fake.files["file-1"]  # the training file was deleted on the service
        trained = train_openai(exported, config(fake), tmp_path / "home", tmp_path / "run2", sleep=lambda s: None)
        assert trained.job_id == "ftjob-2" and fake.jobs["ftjob-2"]["training_file"] == "file-3"
        assert fake.jobs["ftjob-2"]["validation_file"] == "file-2"  # still there: reused


@pytest.mark.slow
def test_the_key_can_come_from_a_prefect_secret_block(prefect_harness, tmp_path, monkeypatch):
    from prefect.blocks.system import Secret

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    Secret(value=KEY).save("tuneloop-openai-key", overwrite=True)
    with FakeOpenAI() as fake:
        fake.valid_key = KEY
        trained = train_openai(exported_files(tmp_path), config(fake, api_key_secret_block="tuneloop-openai-key"),
                               tmp_path / "home", tmp_path / "run", sleep=lambda s: None)
        assert trained.fine_tuned_model
        with pytest.raises(TuneloopError, match="no Prefect Secret block named 'nope'"):
            train_openai(exported_files(tmp_path), config(fake, api_key_secret_block="nope"),
                         tmp_path / "home", tmp_path / "run", sleep=lambda s: None)


def test_chat_completions_in_core_retries_through_the_given_warn_and_reads_the_key_from_the_environment(key):
    from tuneloop.core.config import OpenAITrainConfig
    from tuneloop.core.openai_client import chat_completions

    warnings: list[str] = []
    with FakeOpenAI(answer=lambda model, messages: f"{model}: {messages[-1]['content']}") as fake:
        fake.valid_key = KEY
        fake.faults.append(Fault("POST", "/v1/chat/completions", 503))
        cfg = OpenAITrainConfig(provider="compatible", base_url=fake.base_url, eval_concurrency=1)
        answers = chat_completions(cfg, "m", [[{"role": "user", "content": "hi"}]], 5, warn=warnings.append)
    assert answers == ["m: hi"]
    assert len(warnings) == 1 and "chat.completions (m): HTTP 503" in warnings[0] and KEY not in warnings[0]
