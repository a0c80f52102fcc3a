"""Training on another machine: the retrain flow hands the export over through MLflow, starts the
``train-local`` deployment on the ``gpu`` work pool and takes the adapter back from MLflow.

Nothing crosses machines as a local path: the export goes up as artifacts of a training run, the worker
downloads them, trains, logs the adapter, loss curve and metrics to that run, and hands back a
``LocalAdapter`` record (a persisted Prefect result) that names the run; the caller downloads the adapter.
"""

from __future__ import annotations

import time
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from tuneloop.core.config import TrainConfig
from tuneloop.core.records import ExportedDataset, LocalAdapter, TuneloopError
from tuneloop.lib.base_model import resolve_base_model
from tuneloop.lib.registry import LOSS_CURVES, experiment_id, mlflow_client
from tuneloop.lib.run_context import RunContext
from tuneloop.lib.runlog import stage_logger

TRAINING_KIND = "training"


def start_training_run(exported: ExportedDataset, tracking_uri: str, experiment: str,
                       artifacts_dir: Path | None, init_adapter: Path | None = None) -> str:
    """An MLflow run that carries the export (and an adapter to continue) to the worker and the adapter back."""
    client = mlflow_client(tracking_uri)
    run = client.create_run(experiment_id(client, experiment, artifacts_dir),
                            run_name=f"train-{exported.dataset_version}",
                            tags={"tuneloop.kind": TRAINING_KIND, "dataset_version": exported.dataset_version})
    client.log_artifacts(run.info.run_id, str(exported.directory), "dataset")
    if init_adapter is not None:
        client.log_artifacts(run.info.run_id, str(init_adapter), "init_adapter")
    return run.info.run_id


def fetch_init_adapter(tracking_uri: str, run_id: str, dst: Path) -> Path:
    """The adapter a warm start continues, as the caller put it into the training run."""
    import mlflow

    return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="init_adapter", dst_path=str(dst),
                                                    tracking_uri=tracking_uri))


def fetch_export(exported: ExportedDataset, tracking_uri: str, run_id: str, dst: Path) -> ExportedDataset:
    """The caller's export, downloaded on this machine and checked against the hashes in its record."""
    import hashlib

    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="dataset", dst_path=str(dst),
                                                     tracking_uri=tracking_uri))
    moved = exported.model_copy(update={
        "directory": local, "train_path": local / exported.train_path.name,
        "validation_path": local / exported.validation_path.name, "manifest_path": local / exported.manifest_path.name})
    for name, digest in exported.sha256.items():
        path = local / name
        if path.is_file() and hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise TuneloopError(f"train: {name} downloaded from MLflow run {run_id} does not match its sha256")
    return moved


def publish_training(trained: LocalAdapter, tracking_uri: str, run_id: str) -> LocalAdapter:
    """Adapter, loss curve and metrics into the training run; the record handed back names no local path."""
    from mlflow.entities import Metric

    client = mlflow_client(tracking_uri)
    client.log_artifacts(run_id, str(trained.adapter_path), "adapter")
    if trained.artifacts_dir is not None:
        client.log_artifacts(run_id, str(trained.artifacts_dir), "training")
    now = int(time.time() * 1000)
    metrics = [Metric(LOSS_CURVES["train_loss"], loss, now, step) for step, loss in trained.loss_history]
    for name, value in (("train/tokens_per_second", trained.tokens_per_second),
                        ("train/peak_memory_mb", trained.peak_memory_mb), ("train/seconds", trained.train_seconds)):
        if value is not None:
            metrics.append(Metric(name, float(value), now, 0))
    client.log_batch(run_id, metrics=metrics)
    client.set_terminated(run_id, "FINISHED")
    return trained.model_copy(update={"adapter_path": None, "artifacts_dir": None, "training_run_id": run_id})


def train_on_pool(exported: ExportedDataset, train: TrainConfig, ctx: RunContext,
                  init_adapter: Path | None = None) -> LocalAdapter:
    import mlflow
    from prefect.deployments import run_deployment

    tracking_uri, run_dir = ctx.tracking_uri, ctx.run_dir

    log = stage_logger()
    if tracking_uri.startswith("sqlite:"):
        log.warning("train.local.placement: pool with a SQLite MLflow store works only when the worker shares "
                    "this machine's disk; point registry.tracking_uri at an MLflow server for a remote worker")
    run_id = start_training_run(exported, tracking_uri, ctx.experiment, ctx.artifacts_dir, init_adapter)
    name = train.local.deployment
    log.info(f"train: starting deployment {name} (MLflow training run {run_id}); waiting for a worker of its pool")
    try:
        flow_run = run_deployment(name=name, timeout=None, parameters={
            "exported": exported.model_dump(mode="json"), "train": train.model_dump(mode="json"),
            "tracking_uri": tracking_uri, "training_run_id": run_id, "warm_start": init_adapter is not None})
    except Exception as exc:  # ObjectNotFound and friends: a deployment that was never created
        raise TuneloopError(f"train.local.placement: pool, but deployment {name!r} cannot be started ({exc}); "
                            "deploy it first: tuneloop serve, or prefect deploy --prefect-file "
                            "deployments/prefect.yaml --name train-local (the file is also installed with "
                            "the package, as tuneloop/deployments/prefect.yaml)") from None
    state = flow_run.state
    if state is None or not state.is_completed():
        raise TuneloopError(f"train: flow run {flow_run.name} of {name} ended "
                            f"{state.name if state else 'without a state'}: {state.message if state else ''}")
    trained = LocalAdapter.model_validate(state.result())  # persisted as JSON: read back as a dict
    adapter = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="adapter",
                                                       dst_path=str(run_dir), tracking_uri=tracking_uri))
    training = Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="training",
                                                        dst_path=str(run_dir), tracking_uri=tracking_uri))
    # The worker's copy of the base is its own; this machine evaluates against its own copy of the same base.
    return trained.model_copy(update={"adapter_path": adapter, "artifacts_dir": training,
                                      "base_model": str(resolve_base_model(train, ctx.state.models))})


@task(name="train-on-pool", cache_policy=NO_CACHE)
def train_on_pool_task(exported: ExportedDataset, train: TrainConfig, ctx: RunContext,
                       init_adapter: Path | None = None) -> LocalAdapter:
    return train_on_pool(exported, train, ctx, init_adapter)


@task(name="fetch-export", cache_policy=NO_CACHE)
def fetch_export_task(exported: ExportedDataset, tracking_uri: str, run_id: str, dst: Path) -> ExportedDataset:
    return fetch_export(exported, tracking_uri, run_id, dst)


@task(name="publish-training", cache_policy=NO_CACHE)
def publish_training_task(trained: LocalAdapter, tracking_uri: str, run_id: str) -> LocalAdapter:
    return publish_training(trained, tracking_uri, run_id)


@task(name="fetch-init-adapter", cache_policy=NO_CACHE)
def fetch_init_adapter_task(tracking_uri: str, run_id: str, dst: Path) -> Path:
    return fetch_init_adapter(tracking_uri, run_id, dst)
