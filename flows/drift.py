"""The drift monitor flow: score the champion on recent data, compare recent inputs with its training
data, log both to MLflow, show them as a Prefect artifact, and ask for a retrain when either has drifted.

The retrain is asked for, not called: the flow emits ``tuneloop.drift.detected`` and the retrain
deployment's trigger starts it, under the same one-at-a-time limit as every other retrain. Likewise, a
champion served by an API fine-tune within ``retirement.migrate_days`` of its provider's shutdown emits
``tuneloop.migration.due``, which starts a migrating retrain (``migrate=True``), drift or not.
"""

from __future__ import annotations

from datetime import UTC, datetime

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run

from tuneloop.core.config import PipelineConfig, load_config
from tuneloop.core.retirement import migration_due, relative_days
from tuneloop.core.state import prepare_state
from tuneloop.lib.run_context import RunContext
from tuneloop.lib.runlog import name_flow_run
from tuneloop.tasks.drift import DriftReport, check_drift, drift_markdown, log_drift

DRIFT_EVENT = "tuneloop.drift.detected"
MIGRATION_EVENT = "tuneloop.migration.due"


def model_resource(config: PipelineConfig) -> dict[str, str]:
    return {"prefect.resource.id": f"tuneloop.model.{config.registry.model_name}",
            "prefect.resource.name": config.registry.model_name}


@task(name="check-drift", cache_policy=NO_CACHE)
def check_drift_task(config: PipelineConfig, ctx: RunContext) -> DriftReport:
    return check_drift(config, ctx.state, ctx.registry, ctx.run_dir)


def started_name() -> str:
    return f"drift-check-{datetime.now(UTC):%Y%m%d-%H%M%S}"


@flow(name="drift-monitor", flow_run_name=started_name)
def drift_monitor(config: PipelineConfig | str, overrides: list[str] | None = None) -> DriftReport:
    """Check the champion for performance and input drift; emit tuneloop.drift.detected when it has, and
    tuneloop.migration.due when its provider retires it within retirement.migrate_days."""
    from prefect.events import emit_event

    state = prepare_state()
    log = get_run_logger()
    if isinstance(config, str):
        config = load_config(config, overrides or [])
    work_dir = state.runs / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-drift"
    work_dir.mkdir(parents=True, exist_ok=True)
    ctx = RunContext.open(state, config, work_dir, flow_run.get_id() or "local")

    report = check_drift_task(config, ctx)
    champion = f"-v{report.champion_version}" if report.champion_version else ""
    name_flow_run(f"drift-{'detected' if report.drifted else 'none'}{champion}")
    log_drift(report, config, ctx.registry, ctx.artifacts_dir)
    create_markdown_artifact(drift_markdown(report), key="drift-report", description="drift monitor")
    if report.drifted:
        log.warning("drift detected: " + "; ".join(report.reasons))
        emit_event(DRIFT_EVENT, resource=model_resource(config),
                   payload={"reasons": report.reasons, "champion_version": report.champion_version,
                            "summary": "; ".join(report.reasons)})
    else:
        log.info(f"no drift: {report.note or 'every signal under its threshold'}")
    if report.retirement_warning:
        log.warning(report.retirement_warning)
    if migration_due(report.retirement_days_left, config.retirement):
        summary = (f"champion v{report.champion_version} ({report.champion_model} at {report.champion_provider}) "
                   f"stops answering {report.retires_on.isoformat()} ({relative_days(report.retirement_days_left)})")
        emit_event(MIGRATION_EVENT, resource=model_resource(config),
                   payload={"summary": summary, "date": report.retires_on.isoformat(),
                            "days_left": report.retirement_days_left, "champion_version": report.champion_version,
                            "model": report.champion_model, "provider": report.champion_provider})
    return report
