"""The ``train-local`` flow: LoRA training where the GPUs are.

Deployed to the ``gpu`` work pool (deployments/prefect.yaml), it is started by the retrain flow with
``run_deployment`` when ``train.local.placement: pool``; with ``placement: inline`` (the demo) the retrain
flow calls it in-process as a subflow. On a pool, data and adapter travel through the MLflow run
``training_run_id``; the returned record is a persisted result, so the caller can read it from elsewhere.
"""

from __future__ import annotations

from pathlib import Path

from prefect import flow

from tuneloop.core.config import TrainConfig
from tuneloop.core.records import ExportedDataset, LocalAdapter
from tuneloop.core.state import prepare_state
from tuneloop.lib.run_context import RunContext
from tuneloop.tasks.train_local import train_task
from tuneloop.tasks.train_pool import fetch_export_task, fetch_init_adapter_task, publish_training_task


def run_name() -> str:
    """``train-local-<dataset version>``: which data this training run is on, readable in the UI's run list."""
    from prefect.runtime import flow_run

    try:  # Prefect calls this before the run starts: a name must never fail it
        exported = (flow_run.parameters or {}).get("exported")
        version = exported.get("dataset_version") if isinstance(exported, dict) else getattr(exported, "dataset_version", "")
    except Exception:  # noqa: BLE001
        version = ""
    return f"train-local-{str(version or '')[:8]}".rstrip("-")


# persisted as JSON (a typed record), not a pickle: readable in storage, and nothing to unpickle on the caller's side
@flow(name="train-local", flow_run_name=run_name, persist_result=True, result_serializer="json")
def train_local(exported: ExportedDataset, train: TrainConfig, out_dir: Path | None = None,
                tracking_uri: str | None = None, training_run_id: str | None = None,
                init_adapter: Path | None = None, warm_start: bool = False) -> LocalAdapter:
    """Train a LoRA adapter on the export (or continue ``init_adapter``); with a training run, fetch the
    export (and with ``warm_start`` the adapter to continue) from it and publish the result to it."""
    state = prepare_state()
    if training_run_id is None:  # inline: same process, same disk
        return train_task(exported, train, state.models, out_dir or state.runs / "train-local",
                          state.home / "checkpoints", init_adapter)
    work = state.runs / f"train-local-{training_run_id[:12]}"
    exported = fetch_export_task(exported, tracking_uri, training_run_id, work)
    if warm_start:
        init_adapter = fetch_init_adapter_task(tracking_uri, training_run_id, work)
    trained = train_task(exported, train, state.models, work, state.home / "checkpoints", init_adapter)
    return publish_training_task(trained, tracking_uri, training_run_id)


def train_inline(exported: ExportedDataset, train: TrainConfig, ctx: RunContext, init_adapter: Path | None = None,
                 **options):
    """The backends' one signature, for training in this process: the ``train-local`` flow as a subflow (its
    own run in the UI). Its result needs no persisting: the caller has it in memory."""
    return train_local.with_options(persist_result=False)(exported, train, ctx.run_dir, init_adapter=init_adapter,
                                                          **options)
