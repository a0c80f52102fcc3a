"""The MLflow run of a candidate: what it records about the model it registers.

Params (the whole config, flattened, no password), metrics (scores, promotion deltas, data and token
counts, quality results, training curves), artifacts (the exported data, the adapter or job record, the
evaluation, the quality gate's files), dataset inputs and a one-paragraph description. The register stage
(``tasks/register.py``) creates the run and calls these; the names they log under are MLflow's layout.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tuneloop.core.config import PipelineConfig
from tuneloop.core.records import CheckedBatch, EvalReport, ExportedDataset, PromotionDecision, TrainedModel
from tuneloop.lib.registry import LOSS_CURVES, score_metric

MAX_PARAM_CHARS = 6000

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



def flatten(data: dict[str, Any], prefix: str = "") -> dict[str, str]:
    flat: dict[str, str] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = str(value)[:MAX_PARAM_CHARS]
    return flat



def prefect_run_url(flow_run_id: str) -> str | None:
    """The flow run's page in the Prefect UI, when a UI is configured (a server run; not the ephemeral one)."""
    from prefect.settings import get_current_settings

    ui = get_current_settings().ui_url
    return f"{str(ui).rstrip('/')}/runs/flow-run/{flow_run_id}" if ui else None



def run_params(config: PipelineConfig, report: EvalReport) -> dict[str, str]:
    """The whole config, flattened to dotted names, with the answer budget used and no password."""
    params = flatten(config.model_dump(mode="json", by_alias=True))
    params["evaluate.max_new_tokens"] = str(report.max_new_tokens)  # the budget used, also when sized from the data
    if not config.train.uses_api:  # the rate used, also when it is the base model's default
        params["train.local.learning_rate"] = str(config.train.learning_rate)
    if "source.url" in params:  # a SQLAlchemy URL may carry a password
        from tuneloop.core.scrub import redacted_url

        params["source.url"] = redacted_url(params["source.url"])
    return params



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
    for who in ("base", "candidate", "champion", "majority", "prompted"):  # the task's metrics only
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
    for name, value in trained.figures().items():
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
        client.log_artifacts(run_id, str(trained.artifacts_dir), trained.artifacts_name)
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



def run_description(config: PipelineConfig, checked: CheckedBatch | None, exported: ExportedDataset,
                    trained: TrainedModel, report: EvalReport, decision: PromotionDecision) -> str:
    """One paragraph for the run's Description: what was trained on what, how it scored, what was decided."""
    how = trained.how_trained(config.train.openai.provider)
    data = (f" (read {checked.n_read}: {checked.n_accepted} accepted, {checked.n_quarantined} quarantined, "
            f"{checked.n_duplicates} duplicates)" if checked is not None else "")
    metric = decision.primary_metric
    scores = ", ".join(f"{who} {sc.metrics[metric]:.3f}" for who, sc in
                       (("candidate", report.candidate), ("base", report.base),
                        (f"champion v{report.champion_version}", report.champion),
                        (f"majority class ({report.majority_label})", report.majority),
                        (f"prompted base ({report.shots})", report.prompted))
                       if sc is not None and metric in sc.metrics)
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
