"""train.local.placement: pool, end to end: a real Prefect server, the `gpu` process pool, a worker.

The worker has its own TUNELOOP_HOME: the export reaches it and the adapter comes back only through
MLflow and the persisted Prefect result, never through a local path of the caller.
"""

import pytest
from services import prefect_server

from conftest import DEMO, DEMO_CONFIG, ROOT
from tuneloop.core.config import load_config

pytestmark = pytest.mark.slow


def test_retrain_trains_on_the_gpu_pool_through_a_worker(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from prefect import get_client

    from tuneloop.flows.retrain import retrain

    caller_home, worker_home = tmp_path / "caller", tmp_path / "worker"
    (caller_home / "landing").mkdir(parents=True)
    monkeypatch.setenv("TUNELOOP_HOME", str(caller_home))
    lines = (DEMO / "tickets.jsonl").read_text().splitlines(True)
    (caller_home / "landing" / "tickets.jsonl").write_text("".join(lines[:400]))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # 30 steps of a tiny model: the path to the pool is under test, not the model, so the floors are off
    overrides = ["evaluate.max_examples=40", f"register.tracking_uri={uri}", "train.local.placement=pool",
                 "register.beat_majority=false", "register.beat_prompted=false", "evaluate.few_shot=0"]
    cfg = load_config(DEMO_CONFIG, ["train.local.max_steps=30", *overrides])

    with prefect_server(tmp_path / "prefect") as server:
        server.cli("work-pool", "create", "gpu", "--type", "process")
        out = server.cli("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--name",
                         "train-local", cwd=ROOT)
        assert "train-local" in out
        worker = server.worker("gpu", env={"TUNELOOP_HOME": str(worker_home)})
        with server.client_settings():
            result = retrain(cfg)
            import asyncio

            async def train_runs():
                async with get_client() as client:
                    return await client.read_flow_runs()

            runs = asyncio.run(train_runs())
            # A warm start on the pool: the champion's adapter reaches the worker through the training run.
            (caller_home / "landing" / "more.jsonl").write_text("".join(lines[400:450]))
            warm = retrain(load_config(DEMO_CONFIG, [*overrides, "train.local.init_from=champion", "train.local.max_steps=1",
                                                     "train.local.learning_rate=1e-12", "train.local.warmup_steps=0"]))
        assert worker.poll() is None

    assert result.status == "trained" and result.model_version.decision.promoted
    trained_on_pool = [r for r in runs if r.deployment_id is not None]
    assert len(trained_on_pool) == 1 and trained_on_pool[0].state.is_completed()
    assert list((worker_home / "checkpoints").iterdir())  # the worker trained ...
    assert not (caller_home / "checkpoints").exists()  # ... the caller did not

    client = MlflowClient(uri)
    candidate = client.get_run(result.model_version.run_id)
    training_run_id = candidate.data.tags["training_run_id"]
    training = client.get_run(training_run_id)
    assert training.data.tags["tuneloop.kind"] == "training" and training.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(training_run_id)} >= {"adapter", "dataset", "training"}
    assert len(client.get_metric_history(training_run_id, "loss/train")) >= 2
    assert training.data.metrics["train/tokens_per_second"] > 0
    # The candidate evaluated here is the adapter the worker logged, downloaded from MLflow.
    assert str(tmp_path / "caller") in str(result.run_dir)
    assert result.report.candidate.accuracy > result.report.base.accuracy

    assert warm.status == "trained" and not warm.model_version.decision.promoted  # the champion again: a tie
    assert warm.report.candidate.accuracy == warm.report.champion.accuracy == result.report.candidate.accuracy
    assert client.get_model_version(warm.model_version.name, warm.model_version.version).tags["warm_start_from"] == "1"
    warm_training = client.get_run(warm.model_version.run_id).data.tags["training_run_id"]
    assert "init_adapter" in {a.path for a in client.list_artifacts(warm_training)}
