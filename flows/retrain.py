"""The retrain flow: collect → quality → snapshot → export → train → evaluate → register.

It only composes stages; each stage is a plain function in ``tasks/`` behind a thin Prefect task.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow
from prefect.runtime import flow_run

from flows.config import PipelineConfig
from tasks.collect import collect_task
from tasks.evaluate import evaluate_task
from tasks.export import export_task
from tasks.heldout import read_heldout
from tasks.quality import quality_task
from tasks.records import RetrainResult
from tasks.register import find_champion_task, register_task
from tasks.snapshot import snapshot_task
from tasks.state import prepare_state


@flow(name="retrain")
def retrain(config: PipelineConfig) -> RetrainResult:
    """Retrain on everything in the landing folder; promote the result only if it is better."""
    from tasks.train_local import train_task

    state = prepare_state()
    run_id = flow_run.get_id() or "local"
    run_dir = state.runs / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{run_id[:8]}"
    run_dir.mkdir(parents=True, exist_ok=True)
    tracking_uri = config.registry.tracking_uri or state.tracking_uri
    # A local store keeps artifacts in the state folder; a tracking server decides for itself.
    artifacts_dir = None if tracking_uri.startswith(("http://", "https://", "databricks")) else state.mlflow_artifacts

    landing = config.source.landing or state.landing
    heldout = read_heldout(config.evaluate.holdout, config.mapping, config.evaluate.max_examples)
    raw = collect_task(config.source, landing)
    checked = quality_task(raw, config.mapping, config.quality, run_dir)
    dataset = snapshot_task(checked, state.datasets)
    exported = export_task(dataset, config.export, heldout, state.home / "exports")
    trained = train_task(exported, config.train, state.models, run_dir)
    champion = find_champion_task(config.registry, tracking_uri, run_dir / "champion")
    report = evaluate_task(trained, champion, heldout, config.evaluate, run_dir)
    version = register_task(config, checked, exported, trained, report, tracking_uri, artifacts_dir, run_id)
    return RetrainResult(
        n_read=checked.n_read, n_accepted=checked.n_accepted, n_quarantined=checked.n_quarantined,
        n_duplicates=checked.n_duplicates, dataset_version=dataset.version, report=report,
        model_version=version, run_dir=run_dir,
    )
