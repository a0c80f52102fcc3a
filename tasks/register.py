"""Register: every candidate becomes an MLflow model version; only a better one becomes ``champion``
(the rule is ``tasks.promotion``; this module records and applies it).

The run holds the config as params, the scores as metrics, the exported data, the adapter and the
predictions as artifacts, and the dataset version as a tag, so any model leads back to its data.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tuneloop.core.config import OpenAITrainConfig, PipelineConfig, RegisterConfig
from tuneloop.core.records import (
    METRIC_TITLES,
    Champion,
    CheckedBatch,
    EvalReport,
    ExportedDataset,
    ModelVersion,
    PromotionDecision,
    TrainedModel,
    TuneloopError,
)
from tuneloop.tasks.promotion import decide_promotion
from tuneloop.tasks.runlog import stage_logger

CHAMPION = "champion"
CHALLENGER = "challenger"  # the newest candidate, promoted or not
HISTORY_TAG = "tuneloop.champion_history"  # JSON list of the versions that were champion, oldest first
MAX_PARAM_CHARS = 6000
PROMOTED_EVENT = "tuneloop.model.promoted"  # a Prefect event; `tuneloop notify` hooks a webhook to it


def tuneloop_version() -> str:
    """The installed tuneloop that trained the model (a wheel has no git checkout to ask)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tuneloop")
    except PackageNotFoundError:
        return ""


def git_commit() -> str:
    """The code that trained the model, when it runs from a git checkout."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def champion_history(client, name: str) -> list[str]:
    import json

    raw = client.get_registered_model(name).tags.get(HISTORY_TAG)
    return json.loads(raw) if raw else []


def move_champion(client, name: str, version: str, who: str, why: str) -> str | None:
    """Point ``champion`` at ``version``, remember the move (for rollback) and who made it and why."""
    import json
    from datetime import UTC, datetime

    from mlflow.exceptions import MlflowException

    history = champion_history(client, name)
    if not history:  # a registry from before the history was kept: start it at the current champion
        try:
            history = [str(client.get_model_version_by_alias(name, CHAMPION).version)]
        except MlflowException:
            pass
    previous = history[-1] if history else None
    client.set_registered_model_alias(name, CHAMPION, version)
    if previous != version:
        history.append(version)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
    when = datetime.now(UTC).isoformat(timespec="seconds")
    for key, value in (("champion_set_by", who), ("champion_reason", why), ("champion_set_at", when),
                       ("previous_champion", previous or "")):
        client.set_model_version_tag(name, version, key, value)
    return previous


def client_for(tracking_uri: str):
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri)


EXPERIMENT_KIND = ("mlflow.experimentKind", "finetuning")  # the UI opens it on runs, not on GenAI traces


def experiment_id(client, name: str, artifacts_dir: Path | None) -> str:
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # A local SQLite store would otherwise put artifacts under the current working directory.
        location = artifacts_dir.resolve().as_uri() if artifacts_dir else None
        return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    if EXPERIMENT_KIND[0] not in experiment.tags:  # made by an older tuneloop: the UI guessed GenAI
        client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment.experiment_id


def champion_training(registry: RegisterConfig, tracking_uri: str) -> tuple[str | None, str | None]:
    """The dataset version and settings hash the current champion was trained with (None before the first
    promotion; a settings hash of None for a champion registered before it was recorded)."""
    from mlflow.exceptions import MlflowException

    try:
        tags = client_for(tracking_uri).get_model_version_by_alias(registry.model_name, CHAMPION).tags
    except MlflowException:
        return None, None
    return tags.get("dataset_version"), tags.get("settings_hash")


def find_champion(registry: RegisterConfig, tracking_uri: str, dst: Path) -> Champion | None:
    """The current champion's adapter, downloaded from the registry, or None before the first promotion."""
    import mlflow
    from mlflow.exceptions import MlflowException

    client = client_for(tracking_uri)
    try:
        version = client.get_model_version_by_alias(registry.model_name, CHAMPION)
    except MlflowException:
        return None
    dst.mkdir(parents=True, exist_ok=True)
    local = mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(dst),
                                                tracking_uri=tracking_uri)
    backend = version.tags.get("backend", "local")
    root = Path(local)
    adapter = root / "artifacts" / "adapter" if (root / "MLmodel").exists() else root  # pyfunc, or a bare adapter
    return Champion(version=str(version.version), backend=backend,
                    adapter_path=adapter if backend == "local" else None,
                    fine_tuned_model=version.tags.get("fine_tuned_model") or None,
                    base_model=version.tags.get("base_model", ""), dataset_version=version.tags.get("dataset_version"))


def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)[:MAX_PARAM_CHARS]
    return flat


def run_tags(config: PipelineConfig, trained: TrainedModel, flow_run_id: str | None) -> dict[str, str]:
    """What ties the run and the model version to their data, config, code and training job."""
    tags = {
        "dataset_version": trained.dataset_version,
        "backend": trained.backend,
        "base_model": trained.base_model,
        "config_hash": config.config_hash(),
        "settings_hash": config.settings_hash(),  # what a retrain compares: the settings that shape the model
        "prefect_flow_run_id": flow_run_id or "",
        "git_commit": git_commit(),
        "tuneloop_version": tuneloop_version(),
        "model_digest": model_digest(trained),  # with the two above: one version per trained model, kills or not
        "tuneloop.state": state_id(),
        # what the MLflow UI shows as the run's Source and code version
        "mlflow.source.type": "JOB",
        "mlflow.source.name": "tuneloop retrain flow",
        "mlflow.source.git.commit": git_commit(),
    }
    if flow_run_id and (url := prefect_run_url(flow_run_id)):
        tags["prefect_flow_run_url"] = url
    if trained.backend == "openai":
        tags.update(fine_tuned_model=trained.fine_tuned_model or "", openai_job_id=trained.job_id or "",
                    openai_provider=config.train.openai.provider)
    if trained.training_run_id:
        tags["training_run_id"] = trained.training_run_id  # trained on a work pool: that run holds its logs
    if trained.warm_start_from:
        tags["warm_start_from"] = trained.warm_start_from  # the champion version whose adapter it continued
    return tags


def prefect_run_url(flow_run_id: str) -> str | None:
    """The flow run's page in the Prefect UI, when a UI is configured (a server run; not the ephemeral one)."""
    from prefect.settings import get_current_settings

    ui = get_current_settings().ui_url
    return f"{str(ui).rstrip('/')}/runs/flow-run/{flow_run_id}" if ui else None


def run_params(config: PipelineConfig, report: EvalReport) -> dict[str, str]:
    """The whole config, flattened to dotted names, with the answer budget used and no password."""
    params = flatten(config.model_dump(mode="json", by_alias=True))
    params["evaluate.max_new_tokens"] = str(report.max_new_tokens)  # the budget used, also when sized from the data
    if "source.url" in params:  # a SQLAlchemy URL may carry a password
        from tuneloop.tasks.collect import redacted_url

        params["source.url"] = redacted_url(params["source.url"])
    return params


def score_metric(who: str, metric: str) -> str:
    """The MLflow metric of one model's held-out score (``eval/candidate_accuracy``); the drift monitor reads it."""
    return f"eval/{who}_{metric}"


# How the training loss and its kin are named in MLflow: the curve's last point is the loss the model ended with.
LOSS_CURVES = {"train_loss": "loss/train", "eval_loss": "loss/eval", "valid_loss": "loss/valid",
               "best_eval_loss": "loss/best_eval"}


def run_metrics(checked: CheckedBatch | None, exported: ExportedDataset, trained: TrainedModel, report: EvalReport,
                decision: PromotionDecision) -> list:
    """Scores, promotion deltas, data and token counts, quality results and training curves, as MLflow metrics.

    Grouped by prefix, one chart section each, in the order the MLflow UI sorts them (by name; unprefixed ones
    last): ``eval/`` (each model's task scores and the promotion delta) and ``loss/`` (the curves) first, then
    ``per_class/``, ``promotion_delta/``, ``quality/<suite>/`` (one per expectation), ``records/``, ``teacher/``,
    ``tokens/`` and ``train/``."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    metrics: dict[str, float] = {"eval/promotion_delta": decision.delta}
    for who in ("base", "candidate", "champion"):  # the task's metrics only
        if (sc := getattr(report, who)) is not None:
            metrics.update({score_metric(who, m): v for m, v in sc.metrics.items()})
    metrics.update({f"promotion_delta/{m}": d for m, d in decision.deltas.items()})
    for label, m in report.candidate.per_class.items():
        metrics.update({f"per_class/candidate_{k}.{label}": v for k, v in m.items() if k != "support"})
    metrics.update({"records/n_train": exported.n_train, "records/n_validation": exported.n_validation})
    for split, stats in exported.token_stats.items():
        metrics.update({f"tokens/{split}.{k}": v for k, v in stats.model_dump().items() if isinstance(v, int | float)})
    if exported.estimate:
        metrics.update({"tokens/estimated_billed_tokens": exported.estimate.billed_tokens,
                        "tokens/estimated_cost_usd": exported.estimate.estimated_cost_usd})
    if checked is not None:
        metrics.update({"records/n_read": checked.n_read, "records/n_accepted": checked.n_accepted,
                        "records/n_quarantined": checked.n_quarantined, "records/n_duplicates": checked.n_duplicates,
                        "records/n_pii_redacted": checked.n_redacted})
        metrics.update({f"quality/{o.suite}/{o.key}": o.unexpected_count for o in checked.expectations})
        if (d := checked.distilled) is not None:  # the champion as teacher: what it answered, and at what cost
            metrics.update({"teacher/to_answer": d.n_to_answer, "teacher/answered": d.n_answered,
                            "teacher/set_aside": d.n_quarantined, "teacher/asked": d.n_called,
                            "teacher/cached": d.n_cached})
            if d.estimated_cost_usd is not None:
                metrics["teacher/estimated_cost_usd"] = d.estimated_cost_usd
    if trained.mean_train_loss is not None:
        metrics["loss/train_mean"] = trained.mean_train_loss  # the mean over training, not where it ended
    for name, value in (("seconds", trained.train_seconds), ("trained_tokens", trained.trained_tokens),
                        ("tokens_per_second", trained.tokens_per_second), ("peak_memory_mb", trained.peak_memory_mb),
                        ("resumed_from_step", trained.resumed_from_step)):
        if value is not None:
            metrics[f"train/{name}"] = value
    batch = [Metric(k, float(v), now, 0) for k, v in metrics.items()]
    batch += [Metric(LOSS_CURVES["train_loss"], loss, now, step) for step, loss in trained.loss_history]
    for name, points in trained.step_metrics.items():
        if name == "train_loss":  # openai reports it among its step metrics: it is the curve above
            continue
        key = LOSS_CURVES.get(name, f"train/{name}")
        batch += [Metric(key, value, now, step) for step, value in points]
    return batch


def log_run_data(client, run_id: str, params: dict[str, str], metrics: list, decision: PromotionDecision) -> None:
    """Params, metrics and the decision as run tags, in batches MLflow accepts."""
    from mlflow.entities import Param, RunTag

    items = list(params.items())
    for i in range(0, len(items), 100):  # MLflow accepts at most 100 params per batch
        client.log_batch(run_id, params=[Param(k, v) for k, v in items[i:i + 100]])
    for i in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[i:i + 1000])
    client.log_batch(run_id, tags=[RunTag("promoted", str(decision.promoted).lower()),
                                   RunTag("promotion_reason", decision.reason)])


def log_run_artifacts(client, run_id: str, checked: CheckedBatch | None, exported: ExportedDataset,
                      trained: TrainedModel, report: EvalReport, decision: PromotionDecision) -> None:
    """The exported data, the adapter or job record, the evaluation (predictions, report, decision, confusion
    matrices, worst answers as tables) and the quality gate's files."""
    client.log_artifacts(run_id, str(exported.directory), "dataset")
    if trained.adapter_path is not None:
        client.log_artifacts(run_id, str(trained.adapter_path), "adapter")
    if trained.artifacts_dir is not None:  # openai: job record, step metrics, checkpoints; local: loss curve
        client.log_artifacts(run_id, str(trained.artifacts_dir), "openai" if trained.backend == "openai" else "training")
    client.log_artifact(run_id, str(report.predictions_path), "evaluation")
    client.log_dict(run_id, report.model_dump(mode="json"), "evaluation/report.json")
    client.log_dict(run_id, decision.model_dump(mode="json"), "evaluation/promotion_decision.json")
    for png in sorted(report.predictions_path.parent.glob("confusion_*.png")):
        client.log_artifact(run_id, str(png), "evaluation")
    for who, rows in report.worst.items():  # error analysis, as tables in the MLflow UI
        if rows:
            client.log_table(run_id, {k: [r[k] for r in rows] for k in rows[0]},
                             f"evaluation/worst_{who}.json")
    if checked is not None:
        for path in (checked.quarantine_path, checked.duplicates_path, checked.summary_path):
            client.log_artifact(run_id, str(path), "quality")
        if checked.data_docs is not None:
            client.log_artifacts(run_id, str(checked.data_docs.parent), "quality/data_docs")
        if checked.distilled is not None:  # the teacher's golden outputs, kept past the API model's retirement
            client.log_artifact(run_id, str(checked.distilled.answers_path), "teacher")


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
        deployment=azure.champion_deployment if azure is not None and trained.backend == "openai" else None)
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


def create_version(client, name: str, run, model_id: str, tags: dict[str, str], trained: TrainedModel,
                   report: EvalReport, decision: PromotionDecision):
    """A new version of the registered model (created on first use) from the run's pyfunc; ``challenger``
    moves to it, and ``champion`` too when the decision says so."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name, description="Managed by tuneloop.")
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    run_id = run.info.run_id
    version = client.create_model_version(
        name,
        source=f"models:/{model_id}",  # mlflow.pyfunc.load_model("models:/NAME@champion")
        run_id=run_id,
        model_id=model_id,
        tags={**tags, **({"adapter_artifact": f"runs:/{run_id}/adapter"} if trained.adapter_path is not None else {}),
              "task": report.task, **{f"candidate_{m}": str(v) for m, v in report.candidate.metrics.items()},
              "promoted": str(decision.promoted), "promotion_reason": decision.reason},
        description=decision.reason,
    )
    link_model_to_version(client, name, version)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    if decision.promoted:
        move_champion(client, name, str(version.version), "tuneloop retrain", decision.reason)
    return version


def model_digest(trained: TrainedModel) -> str:
    """What identifies the trained model itself: the adapter's bytes (local) or the service's model id (openai).
    A rerun after a kill reuses the finished training, so it has the same digest as the run that died."""
    import hashlib

    from tuneloop.core.state import sha256_file

    if trained.adapter_path is None:
        return f"openai:{trained.fine_tuned_model or trained.job_id or ''}"
    digest = hashlib.sha256()
    for path in sorted(p for p in Path(trained.adapter_path).rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(trained.adapter_path)}\0{sha256_file(path)}\n".encode())
    return digest.hexdigest()[:32]


def state_id() -> str:
    """This state folder on this machine: runs left RUNNING by it were killed (a run holds its lock)."""
    import socket

    from tuneloop.core.state import tuneloop_home

    return f"{socket.gethostname()}:{tuneloop_home()}"


def registered_versions(client, name: str, dataset_version: str, settings_hash: str | None,
                        digest: str | None = None) -> list:
    """Versions of ``name`` trained on ``dataset_version`` with these settings (and, given, this model)."""
    from mlflow.exceptions import MlflowException

    try:
        found = client.search_model_versions(f"name='{name}' and tags.dataset_version='{dataset_version}'")
    except MlflowException:
        return []
    return [v for v in found if (settings_hash is None or v.tags.get("settings_hash") in (None, settings_hash))
            and (digest is None or v.tags.get("model_digest") == digest)]


def registry_view(registry: RegisterConfig, tracking_uri: str, dataset_version: str, settings_hash: str):
    """What the registry holds for a dataset version and settings: the newest such model version, and whether
    the run that registered it finished (a kill leaves it RUNNING)."""
    from tuneloop.tasks.ledger import Registered

    client = client_for(tracking_uri)
    found = registered_versions(client, registry.model_name, dataset_version, settings_hash)
    if not found:
        return Registered()
    newest = max(found, key=lambda v: int(v.version))
    try:
        complete = client.get_run(newest.run_id).info.status != "RUNNING" if newest.run_id else True
    except Exception:  # noqa: BLE001 - the run was deleted: nothing left to finish
        complete = True
    return Registered(version=str(newest.version), complete=complete)


def complete_registration(registry: RegisterConfig, tracking_uri: str, version: str) -> ModelVersion:
    """Finish a registration a killed run left: its run FINISHED, its aliases as its decision said; other runs
    it left RUNNING marked FAILED."""
    client = client_for(tracking_uri)
    mv = client.get_model_version(registry.model_name, version)
    try:  # the decision the killed run made, as it logged it before registering
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            path = client.download_artifacts(mv.run_id, "evaluation/promotion_decision.json", tmp)
            decision = PromotionDecision.model_validate_json(Path(path).read_bytes())
    except Exception:  # noqa: BLE001 - artifact gone: the version's tags say as much as is needed
        decision = PromotionDecision(promoted=mv.tags.get("promoted") == "True", baseline="base", delta=0.0,
                                     reason=mv.tags.get("promotion_reason", ""))
    experiment = client.get_run(mv.run_id).info.experiment_id
    close_orphan_runs(client, experiment, keep=mv.run_id)
    adopt_version(client, registry.model_name, mv, decision)
    aliases = [CHAMPION, CHALLENGER] if decision.promoted else [CHALLENGER]
    return ModelVersion(name=registry.model_name, version=version, run_id=mv.run_id, aliases=aliases,
                        decision=decision, tracking_uri=tracking_uri)


def close_orphan_runs(client, experiment: str, keep: str | None = None) -> list[str]:
    """Runs this state folder left RUNNING (killed, or a full disk): marked FAILED, so none stays 'running'
    forever in the UI. Only this state folder's: another machine's run may really be running."""
    from mlflow.entities import RunTag

    orphans = client.search_runs(
        [experiment], f"attributes.status = 'RUNNING' and tags.`tuneloop.state` = '{state_id()}'", max_results=100)
    closed = []
    for run in orphans:
        if run.info.run_id == keep:
            continue
        client.log_batch(run.info.run_id, tags=[RunTag("tuneloop.ended", "the run was killed before it finished; "
                                                       "marked FAILED by the next run")])
        client.set_terminated(run.info.run_id, "FAILED")
        fail_pending_models(client, experiment, run.info.run_id)
        closed.append(run.info.run_id)
    return closed


def fail_pending_models(client, experiment: str, run_id: str) -> None:
    """A model a killed run was uploading stays PENDING in the Models tab forever: mark it FAILED."""
    from mlflow.entities import LoggedModelStatus

    for model in client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'"):
        if model.status == LoggedModelStatus.PENDING:
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)


def link_model_to_version(client, name: str, version) -> None:
    """The logged model's page lists the versions made from it (what mlflow.register_model records); the
    SQLite registry keeps no model id on the version, its ``models:/<id>`` source names it."""
    import json

    source = version.source or ""
    if not source.startswith("models:/m-"):
        return  # a version of the run's artifacts (registered before logged models): nothing to link
    model_id = source.removeprefix("models:/").split("/")[0]
    linked = json.loads(client.get_logged_model(model_id).tags.get("mlflow.modelVersions") or "[]")
    if not any(str(v.get("version")) == str(version.version) and v.get("name") == name for v in linked):
        client.set_logged_model_tags(model_id, {"mlflow.modelVersions": json.dumps(
            [*linked, {"name": name, "version": version.version}])})


def adopt_version(client, name: str, version, decision: PromotionDecision) -> None:
    """Finish what a killed run left of a registration: its run, its aliases."""
    run = client.get_run(version.run_id) if version.run_id else None
    if run is not None and run.info.status == "RUNNING":  # killed after the version existed: all was logged
        client.set_terminated(version.run_id, "FINISHED")
    link_model_to_version(client, name, version)
    client.set_registered_model_alias(name, CHALLENGER, version.version)
    if decision.promoted:
        try:
            current = str(client.get_model_version_by_alias(name, CHAMPION).version)
        except Exception:  # noqa: BLE001 - no champion yet
            current = None
        if current != str(version.version):
            move_champion(client, name, str(version.version), "tuneloop retrain", decision.reason)


def settle_deployments(config: PipelineConfig, trained: TrainedModel, decision: PromotionDecision,
                       version: str) -> None:
    """Azure with managed deployments, once the decision is recorded: a promoted candidate takes over the
    champion's deployment, and the candidate's own deployment is deleted either way. A champion's deployment
    left serving the old model is an error (apps would still get it); a leftover candidate deployment only a
    warning (the next evaluation deletes it)."""
    from tuneloop.tasks.azure_deploy import deployments_of, settle_candidate

    azure = deployments_of(config.train.openai)
    if azure is None or trained.backend != "openai" or not trained.fine_tuned_model:
        return
    try:
        settle_candidate(azure, trained.fine_tuned_model, trained.job_id, decision.promoted)
    except TuneloopError as exc:
        if decision.promoted:
            raise TuneloopError(f"register: {config.registry.model_name} version {version} is champion, but {exc}; "
                                f"then run `tuneloop promote {version}` to re-point the deployment") from None
        stage_logger().warning(f"register: the candidate's deployment is left ({exc}); the next evaluation "
                               "deletes it")


def run_description(config: PipelineConfig, checked: CheckedBatch | None, exported: ExportedDataset,
                    trained: TrainedModel, report: EvalReport, decision: PromotionDecision) -> str:
    """One paragraph for the run's Description: what was trained on what, how it scored, what was decided."""
    how = (f"LoRA on `{trained.base_model}`, {trained.steps} steps" if trained.backend == "local"
           else f"the {config.train.openai.provider} fine-tuning API from `{trained.base_model}` "
                f"(`{trained.fine_tuned_model}`)")
    data = (f" (read {checked.n_read}: {checked.n_accepted} accepted, {checked.n_quarantined} quarantined, "
            f"{checked.n_duplicates} duplicates)" if checked is not None else "")
    metric = decision.primary_metric
    scores = ", ".join(f"{who} {sc.metrics[metric]:.3f}" for who, sc in
                       (("candidate", report.candidate), ("base", report.base),
                        (f"champion v{report.champion_version}", report.champion)) if sc is not None and metric in sc.metrics)
    scored = f"On {report.n_examples} held-out examples, {metric}: {scores}. " if scores else ""
    verdict = "Promoted to `champion`" if decision.promoted else "Not promoted"
    return (f"Trained {how} on dataset version `{trained.dataset_version}`: {exported.n_train} training and "
            f"{exported.n_validation} validation examples{data}. {scored}{verdict}: {decision.reason}")


def log_datasets(client, run_id: str, exported: ExportedDataset, report: EvalReport, config: PipelineConfig) -> None:
    """The data as MLflow dataset inputs (the UI's Datasets): the snapshot's training and validation splits
    (digest: the dataset version / the file's hash) and the held-out set the candidate was scored on."""
    import json

    from mlflow.entities import Dataset, DatasetInput, InputTag

    from tuneloop.core.state import sha256_file

    def entry(name: str, digest: str, path: Path, context: str, **profile) -> DatasetInput:
        dataset = Dataset(name=name, digest=digest[:36], source_type="local",
                          source=json.dumps({"uri": str(Path(path).resolve())}), profile=json.dumps(profile))
        return DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context)])

    version = exported.dataset_version
    inputs = [entry(f"dataset-{version[:8]}", version, exported.train_path, "training", num_rows=exported.n_train,
                    dataset_version=version, sha256=exported.sha256.get("train.jsonl", "")),
              entry(f"dataset-{version[:8]}-validation", exported.sha256.get("validation.jsonl") or version,
                    exported.validation_path, "validation", num_rows=exported.n_validation, dataset_version=version)]
    holdout = Path(config.evaluate.holdout)
    if holdout.is_file():
        inputs.append(entry(f"heldout-{holdout.stem}", sha256_file(holdout)[:16], holdout, "evaluation",
                            examples_scored=report.n_examples))
    client.log_inputs(run_id, datasets=inputs)


def register_candidate(
    config: PipelineConfig,
    checked: CheckedBatch | None,
    exported: ExportedDataset,
    trained: TrainedModel,
    report: EvalReport,
    tracking_uri: str,
    artifacts_dir: Path | None,
    flow_run_id: str | None = None,
    started: datetime | None = None,
) -> ModelVersion:
    """One MLflow run with everything that made the candidate, and a model version; the run is marked
    FAILED if any of it fails.

    Idempotent: one version per (dataset version, settings, trained model). A run killed after it registered
    leaves a version that the rerun finds by its tags and completes (run finished, aliases set) instead of
    registering the same model twice; runs left RUNNING by a kill are marked FAILED."""
    registry = config.registry
    client = client_for(tracking_uri)
    exp = experiment_id(client, registry.experiment, artifacts_dir)
    # the champion the candidate was evaluated against (a champion that could not be scored compares with base)
    decision = decide_promotion(report, config.evaluate, registry, has_champion=report.champion is not None)
    tags = run_tags(config, trained, flow_run_id)
    existing = registered_versions(client, registry.model_name, trained.dataset_version, tags["settings_hash"],
                                   tags["model_digest"])
    close_orphan_runs(client, exp, keep=existing[0].run_id if existing else None)
    if existing:
        version = existing[0]
        adopt_version(client, registry.model_name, version, decision)
        stage_logger().info(f"register: {registry.model_name} version {version.version} already holds this model "
                            f"(a run killed after registering it); completed it instead of registering it again")
        settle_deployments(config, trained, decision, str(version.version))
        aliases = [CHAMPION, CHALLENGER] if decision.promoted else [CHALLENGER]
        return ModelVersion(name=registry.model_name, version=str(version.version), run_id=version.run_id or "",
                            aliases=aliases, decision=decision, tracking_uri=tracking_uri)
    # the run stands for the whole pipeline run: it starts when the pipeline started (its duration is the run's)
    run = client.create_run(exp, run_name=f"retrain-{trained.dataset_version[:8]}", tags=tags,
                            start_time=int(started.timestamp() * 1000) if started else None)
    run_id = run.info.run_id
    try:
        log_run_data(client, run_id, run_params(config, report),
                     run_metrics(checked, exported, trained, report, decision), decision)
        client.set_tag(run_id, "mlflow.note.content", run_description(config, checked, exported, trained, report,
                                                                      decision))
        log_datasets(client, run_id, exported, report, config)
        log_run_artifacts(client, run_id, checked, exported, trained, report, decision)
        model_id = log_champion_model(client, run_id, exp, config, trained, report)
        version = create_version(client, registry.model_name, run, model_id, tags, trained, report, decision)
        client.set_terminated(run_id, "FINISHED")
    except BaseException:
        client.set_terminated(run_id, "FAILED")
        raise
    settle_deployments(config, trained, decision, str(version.version))
    aliases = [CHAMPION, CHALLENGER] if decision.promoted else [CHALLENGER]
    return ModelVersion(name=registry.model_name, version=str(version.version), run_id=run_id, aliases=aliases,
                        decision=decision, tracking_uri=tracking_uri)


def _version(client, name: str, version: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version(name, version)
    except MlflowException:
        known = [str(v.version) for v in client.search_model_versions(f"name='{name}'")]
        raise TuneloopError(f"model {name!r} has no version {version!r}"
                            + (f" (versions: {', '.join(sorted(known, key=int))})" if known else " (no versions yet)")) from None


def repoint_to_version(openai: OpenAITrainConfig | None, mv) -> str | None:
    """When ``mv`` is an Azure fine-tune and tuneloop manages the deployments: the champion's deployment
    serves it (before the alias moves, so a failure changes nothing). Returns the deployment, or None."""
    from tuneloop.tasks.azure_deploy import deployments_of, repoint_champion

    azure = deployments_of(openai)
    model = mv.tags.get("fine_tuned_model")
    if azure is None or mv.tags.get("backend") != "openai" or not model:
        return None
    repoint_champion(azure, model)
    return azure.champion_deployment


def promote_version(tracking_uri: str, name: str, version: str, who: str, why: str,
                    openai: OpenAITrainConfig | None = None) -> str | None:
    """``tuneloop promote``: make ``version`` champion by hand; returns the version it replaced. With
    ``openai`` (the config's train.openai) on Azure, the champion's deployment is re-pointed to it first."""
    client = client_for(tracking_uri)
    repoint_to_version(openai, _version(client, name, version))
    return move_champion(client, name, version, who, why)


def rollback_champion(tracking_uri: str, name: str, who: str, why: str,
                      openai: OpenAITrainConfig | None = None) -> tuple[str, str]:
    """``tuneloop rollback``: champion back to the version that was champion before; returns (from, to). With
    ``openai`` on Azure, the champion's deployment is re-pointed to it first."""
    import json
    from datetime import UTC, datetime

    client = client_for(tracking_uri)
    history = champion_history(client, name)
    if len(history) < 2:
        raise TuneloopError(f"model {name!r} has no earlier champion to roll back to "
                            f"(champion history: {', '.join(history) or 'empty'})")
    current, previous = history[-1], history[-2]
    repoint_to_version(openai, _version(client, name, previous))
    client.set_registered_model_alias(name, CHAMPION, previous)
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[:-1]))
    when = datetime.now(UTC).isoformat(timespec="seconds")
    for key, value in (("rolled_back_by", who), ("rolled_back_reason", why), ("rolled_back_at", when)):
        client.set_model_version_tag(name, current, key, value)
    for key, value in (("champion_set_by", who), ("champion_reason", f"rollback from v{current}: {why}"),
                       ("champion_set_at", when)):
        client.set_model_version_tag(name, previous, key, value)
    return current, previous


def list_versions(tracking_uri: str, name: str) -> list[dict[str, Any]]:
    """``tuneloop models``: every version with its aliases, scores, data and how it came to be; a version has
    the scores of its task only (a key per metric it was registered with: ``accuracy``, ``rouge_l``, ...)."""
    from mlflow.exceptions import MlflowException

    client = client_for(tracking_uri)
    try:
        aliases = client.get_registered_model(name).aliases  # on SQLite, search results carry no aliases
    except MlflowException:
        raise TuneloopError(f"no registered model {name!r} at {tracking_uri} yet") from None
    by_version: dict[str, list[str]] = {}
    for alias, version in aliases.items():
        by_version.setdefault(str(version), []).append(alias)
    rows = []
    for v in sorted(client.search_model_versions(f"name='{name}'"), key=lambda v: int(v.version)):
        t = v.tags
        rows.append({"version": str(v.version), "aliases": sorted(by_version.get(str(v.version), [])),
                     "task": t.get("task"), **{m: t[f"candidate_{m}"] for m in METRIC_TITLES if f"candidate_{m}" in t},
                     "dataset_version": t.get("dataset_version"), "backend": t.get("backend"),
                     "base_model": t.get("base_model"), "fine_tuned_model": t.get("fine_tuned_model"),
                     "openai_provider": t.get("openai_provider"),
                     "promoted": t.get("promoted"), "set_by": t.get("champion_set_by"),
                     "created": v.creation_timestamp, "reason": t.get("promotion_reason")})
    return rows


LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"  # where `make mlflow-ui` serves a local store


def mlflow_version_url(mv: ModelVersion) -> tuple[str, str]:
    """The model version's page in the MLflow UI (it links to the run), and how that UI is started."""
    from urllib.parse import quote

    remote = mv.tracking_uri.startswith(("http://", "https://"))
    base = mv.tracking_uri.rstrip("/") if remote else LOCAL_MLFLOW_UI
    how = "" if remote else " (with `make mlflow-ui` or `mlflow ui --backend-store-uri " + mv.tracking_uri + "`)"
    # the UI keeps GenAI or model-training mode per browser, GenAI by default: the link asks for model training
    return f"{base}/#/models/{quote(mv.name)}/versions/{mv.version}?workflowType=machine_learning", how


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
def find_champion_task(registry: RegisterConfig, tracking_uri: str, dst: Path) -> Champion | None:
    champion = find_champion(registry, tracking_uri, dst)
    get_run_logger().info(f"registry: champion is version {champion.version}" if champion else "registry: no champion yet")
    return champion


@task(name="complete-registration", cache_policy=NO_CACHE)
def complete_registration_task(registry: RegisterConfig, tracking_uri: str, version: str) -> ModelVersion:
    mv = complete_registration(registry, tracking_uri, version)
    get_run_logger().info(f"register: completed {mv.name} version {mv.version} ({', '.join(mv.aliases)})")
    return mv


@task(name="register", cache_policy=NO_CACHE)
def register_task(config: PipelineConfig, checked: CheckedBatch | None, exported: ExportedDataset, trained: TrainedModel,
                  report: EvalReport, tracking_uri: str, artifacts_dir: Path | None,
                  flow_run_id: str | None, started: datetime | None = None) -> ModelVersion:
    mv = register_candidate(config, checked, exported, trained, report, tracking_uri, artifacts_dir, flow_run_id,
                            started)
    create_markdown_artifact(decision_markdown(mv), key="promotion", description="promotion decision")
    get_run_logger().info(f"register: {mv.name} version {mv.version}; {mv.decision.reason}")
    if mv.decision.promoted:
        announce_promotion(mv.name, mv.version, f"{mv.name} version {mv.version} promoted: {mv.decision.reason}")
    return mv
