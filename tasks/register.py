"""Register: every candidate becomes an MLflow model version; only a better one becomes ``champion``
(the rule is ``lib/promotion.py``; this stage records and applies it).

The run holds the config as params, the scores as metrics, the exported data, the adapter and the
predictions as artifacts (``lib/candidate_run.py``), and its lineage as tags (``core/lineage.py``), so any
model leads back to its data. The registry itself (versions, aliases, repair) is ``lib/registry.py``'s.
"""

from __future__ import annotations

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tuneloop.core.config import PipelineConfig
from tuneloop.core.lineage import Lineage
from tuneloop.core.records import (
    Champion,
    CheckedBatch,
    EvalReport,
    ExportedDataset,
    ModelVersion,
    PromotionDecision,
    TrainedModel,
    TuneloopError,
)
from tuneloop.lib.candidate_run import (
    git_commit,
    log_datasets,
    log_run_artifacts,
    log_run_data,
    model_digest,
    prefect_run_url,
    run_description,
    run_metrics,
    run_params,
    tuneloop_version,
)
from tuneloop.lib.promotion import decide_promotion
from tuneloop.lib.registry import PROMOTED_EVENT, ModelRegistry, mlflow_version_url, state_id
from tuneloop.lib.run_context import RunContext
from tuneloop.lib.runlog import stage_logger


def lineage_of(config: PipelineConfig, trained: TrainedModel, flow_run_id: str | None) -> Lineage:
    """What ties the run and the model version to their data, config, code and training job."""
    return Lineage(
        dataset_version=trained.dataset_version, backend=trained.backend, base_model=trained.base_model,
        config_hash=config.config_hash(),
        settings_hash=config.settings_hash(),  # what a retrain compares: the settings that shape the model
        prefect_flow_run_id=flow_run_id or "", git_commit=git_commit(), tuneloop_version=tuneloop_version(),
        model_digest=model_digest(trained),  # with the two above: one version per trained model, kills or not
        state=state_id(),
        prefect_flow_run_url=prefect_run_url(flow_run_id) if flow_run_id else None,
        **trained.lineage_fields(config.train.openai.provider))


def run_tags(config: PipelineConfig, trained: TrainedModel, flow_run_id: str | None) -> dict[str, str]:
    """The lineage, and what the MLflow UI shows as the run's Source and code version."""
    return {**lineage_of(config, trained, flow_run_id).tags(), "mlflow.source.type": "JOB",
            "mlflow.source.name": "tuneloop retrain flow", "mlflow.source.git.commit": git_commit()}


def log_champion_model(client, run_id: str, experiment: str, config: PipelineConfig, trained: TrainedModel,
                       report: EvalReport) -> str:
    """The serving pyfunc (``models:/NAME@champion`` answers in one call), logged as an MLflow model of the run
    (the UI's run → model → registered version lineage); returns its model id."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    from tuneloop.core.serving import save_champion_model

    openai_settings = config.train.openai.model_dump(include={
        "provider", "base_url", "api_key_env", "azure_endpoint", "azure_api_version", "eval_concurrency",
        "request_retries"})
    azure = config.train.openai.azure_deployments if config.train.openai.provider == "azure" else None
    pyfunc_dir = save_champion_model(
        report.predictions_path.parent / "pyfunc" / "model", trained.backend, trained.base_model,
        trained.adapter_path, trained.fine_tuned_model, openai_settings, config.mapping.system,
        report.max_new_tokens,
        deployment=azure.champion_deployment if azure is not None and trained.is_api_model else None)
    model = client.create_logged_model(experiment, name="model", source_run_id=run_id, model_type="tuneloop-champion",
                                       tags={"dataset_version": trained.dataset_version, "backend": trained.backend},
                                       params={"base_model": trained.base_model})
    try:
        client.log_model_artifacts(model.model_id, str(pyfunc_dir))
    except BaseException:
        client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
        raise
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    return model.model_id


def settle_deployments(config: PipelineConfig, trained: TrainedModel, decision: PromotionDecision,
                       version: str) -> None:
    """Azure with managed deployments, once the decision is recorded: a promoted candidate takes over the
    champion's deployment, and the candidate's own deployment is deleted either way. A champion's deployment
    left serving the old model is an error (apps would still get it); a leftover candidate deployment only a
    warning (the next evaluation deletes it)."""
    from tuneloop.lib.azure_deploy import deployments_of, settle_candidate

    azure = deployments_of(config.train.openai)
    if azure is None or not trained.fine_tuned_model:  # a local adapter has none
        return
    try:
        settle_candidate(azure, trained.fine_tuned_model, trained.job_id, decision.promoted)
    except TuneloopError as exc:
        if decision.promoted:
            raise TuneloopError(f"register: {config.registry.model_name} version {version} is champion, but {exc}; "
                                f"then run `tuneloop promote {version}` to re-point the deployment") from None
        stage_logger().warning(f"register: the candidate's deployment is left ({exc}); the next evaluation "
                               "deletes it")


def register_candidate(ctx: RunContext, config: PipelineConfig, checked: CheckedBatch | None,
                       exported: ExportedDataset, trained: TrainedModel, report: EvalReport) -> ModelVersion:
    """One MLflow run with everything that made the candidate, and a model version; the run is marked
    FAILED if any of it fails.

    Idempotent: one version per (dataset version, settings, trained model). A run killed after it registered
    leaves a version that the rerun finds by its tags and completes (run finished, aliases set) instead of
    registering the same model twice; runs left RUNNING by a kill are marked FAILED."""
    registry = ctx.registry
    client = registry.client
    exp = registry.experiment_id(config.registry.experiment, ctx.artifacts_dir)
    # the champion the candidate was evaluated against (a champion that could not be scored compares with base)
    decision = decide_promotion(report, config.evaluate, config.registry, has_champion=report.champion is not None)
    lineage = lineage_of(config, trained, ctx.run_id)
    tags = run_tags(config, trained, ctx.run_id)
    existing = registry.versions_of(trained.dataset_version, lineage.settings_hash, lineage.model_digest)
    registry.close_orphan_runs(exp, keep=existing[0].run_id if existing else None)
    if existing:
        version = existing[0]
        registry.adopt(version, decision)
        stage_logger().info(f"register: {registry.model_name} version {version.version} already holds this model "
                            f"(a run killed after registering it); completed it instead of registering it again")
        settle_deployments(config, trained, decision, str(version.version))
        return registry.model_version(str(version.version), version.run_id, decision)
    # the run stands for the whole pipeline run: it starts when the pipeline started (its duration is the run's)
    run = client.create_run(exp, run_name=f"retrain-{trained.dataset_version[:8]}", tags=tags,
                            start_time=int(ctx.started.timestamp() * 1000) if ctx.started else None)
    run_id = run.info.run_id
    try:
        log_run_data(client, run_id, run_params(config, report),
                     run_metrics(checked, exported, trained, report, decision), decision)
        client.set_tag(run_id, "mlflow.note.content", run_description(config, checked, exported, trained, report,
                                                                      decision))
        log_datasets(client, run_id, exported, report, config)
        log_run_artifacts(client, run_id, checked, exported, trained, report, decision)
        model_id = log_champion_model(client, run_id, exp, config, trained, report)
        version_tags = {**tags, "task": report.task, "promoted": str(decision.promoted),
                        "promotion_reason": decision.reason,
                        **({"adapter_artifact": f"runs:/{run_id}/adapter"} if trained.adapter_path is not None else {}),
                        **{f"candidate_{m}": str(v) for m, v in report.candidate.metrics.items()}}
        version = registry.create_version(run_id, model_id, version_tags, decision.reason, decision.promoted,
                                          decision.reason)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    settle_deployments(config, trained, decision, str(version.version))
    return registry.model_version(str(version.version), run_id, decision)


def decision_markdown(mv: ModelVersion) -> str:
    verdict = "promoted to `champion`" if mv.decision.promoted else "not promoted; `champion` unchanged"
    url, how = mlflow_version_url(mv)
    return (f"## Promotion\n\nModel `{mv.name}` version **{mv.version}**: {verdict}.\n\n"
            f"Reason: {mv.decision.reason}\n\nIn MLflow: [{mv.name} version {mv.version}]({url}){how}; "
            f"run `{mv.run_id}`.")


def announce_promotion(model_name: str, version: str, summary: str) -> None:
    from prefect.events import emit_event

    emit_event(PROMOTED_EVENT, resource={"prefect.resource.id": f"tuneloop.model.{model_name}",
                                         "prefect.resource.name": model_name},
               payload={"version": version, "summary": summary})


@task(name="find-champion", cache_policy=NO_CACHE)
def find_champion_task(registry: ModelRegistry, dst) -> Champion | None:
    champion = registry.download_champion(dst)
    get_run_logger().info(f"registry: champion is version {champion.version}" if champion else "registry: no champion yet")
    return champion


@task(name="complete-registration", cache_policy=NO_CACHE)
def complete_registration_task(registry: ModelRegistry, version: str) -> ModelVersion:
    mv = registry.complete(version)
    get_run_logger().info(f"register: completed {mv.name} version {mv.version} ({', '.join(mv.aliases)})")
    return mv


@task(name="register", cache_policy=NO_CACHE)
def register_task(ctx: RunContext, config: PipelineConfig, checked: CheckedBatch | None, exported: ExportedDataset,
                  trained: TrainedModel, report: EvalReport) -> ModelVersion:
    mv = register_candidate(ctx, config, checked, exported, trained, report)
    create_markdown_artifact(decision_markdown(mv), key="promotion", description="promotion decision")
    get_run_logger().info(f"register: {mv.name} version {mv.version}; {mv.decision.reason}")
    if mv.decision.promoted:
        announce_promotion(mv.name, mv.version, f"{mv.name} version {mv.version} promoted: {mv.decision.reason}")
    return mv
