"""Drift: is the champion still good on what the company sends now?

Two signals. Performance drift: the champion's primary metric on the most recent labeled examples against
its value when it was promoted (its held-out score). Input drift: recent inputs against the champion's
training snapshot: the population stability index (PSI) of ticket lengths and of labels, and the share of
recent words the training data never contained (a new product line shows up here before any label does).

"Recent" is what arrived after the champion's training data: complete landing files not consumed yet (put
through the quality gate, nothing committed) and, failing those, examples of newer dataset versions.
"""

from __future__ import annotations

import math
import os
import re
from collections import Counter
from datetime import date
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from tuneloop.core.config import PipelineConfig
from tuneloop.core.lineage import Lineage
from tuneloop.core.records import ChatExample, ModelScore, TuneloopError
from tuneloop.core.state import StateLayout
from tuneloop.lib.registry import CHAMPION, ModelRegistry, score_metric

if TYPE_CHECKING:
    from tuneloop.lib.heldout import HeldOutExample

WORD = re.compile(r"[^\W\d_]{2,}", re.UNICODE)
EPS = 1e-4


class DriftReport(BaseModel):
    champion_version: str | None = None
    champion_dataset_version: str | None = None
    n_reference: int = 0
    n_recent: int = 0
    recent_from: str = ""
    metric: str = "accuracy"
    at_promotion: float | None = None
    recent_value: float | None = None
    metric_drop: float | None = None
    psi_length: float | None = None
    psi_label: float | None = None
    new_vocabulary_share: float | None = None
    drifted: bool = False
    reasons: list[str] = Field(default_factory=list)
    note: str = ""
    # an API-backed champion stops answering when its provider retires it (config retirement)
    champion_model: str | None = None
    champion_provider: str | None = None
    retires_on: date | None = None
    retirement_days_left: int | None = None
    retirement_warning: str = ""  # within retirement.warn_days: who stops answering when, and what to do


def psi(expected: Counter, actual: Counter) -> float:
    """Population stability index over the union of categories (a small floor keeps empty bins finite)."""
    keys = set(expected) | set(actual)
    n_e, n_a = sum(expected.values()) or 1, sum(actual.values()) or 1
    total = 0.0
    for k in keys:
        e = max(expected.get(k, 0) / n_e, EPS)
        a = max(actual.get(k, 0) / n_a, EPS)
        total += (a - e) * math.log(a / e)
    return round(total, 4)


def length_psi(reference: list[int], recent: list[int], bins: int = 10) -> float:
    """PSI of lengths in the reference's deciles (the usual binning for a numeric feature)."""
    ordered = sorted(reference)
    edges = sorted({ordered[min(len(ordered) - 1, int(len(ordered) * q / bins))] for q in range(1, bins)})

    def bucket(values: list[int]) -> Counter:
        import bisect

        return Counter(bisect.bisect_right(edges, v) for v in values)

    return psi(bucket(reference), bucket(recent))


def new_vocabulary_share(reference: list[str], recent: list[str]) -> float:
    """Share of recent word occurrences whose word never appears in the reference texts."""
    known = {w for t in reference for w in WORD.findall(t.casefold())}
    words = [w for t in recent for w in WORD.findall(t.casefold())]
    return round(sum(w not in known for w in words) / len(words), 4) if words else 0.0


def _user_of(messages: list[dict]) -> str:
    return "\n".join(str(m.get("content") or "") for m in messages if m.get("role") == "user")


def _user_text(example: ChatExample) -> str:
    return _user_of(example.messages)


def input_drift(reference: list[ChatExample], recent: list[ChatExample], window: int | None = None) -> dict[str, float]:
    """Recent inputs against the champion's training data (in landing order, newest last).

    Distributions (lengths, labels) are compared with the last ``window`` training examples: the world as
    the champion last learned it. Against all of its data, a lasting change (a new queue) would read as drift
    forever after a retrain had absorbed it, since the old examples still outnumber the new. Vocabulary is
    compared with all of it: a word the model was ever trained on is not new.
    """
    latest = slice(-window, None) if window else slice(None)
    ref_texts, new_texts = [_user_text(e) for e in reference], [_user_text(e) for e in recent]
    out = {"psi_length": length_psi([len(t) for t in ref_texts[latest]], [len(t) for t in new_texts]),
           "new_vocabulary_share": new_vocabulary_share(ref_texts, new_texts)}
    if any(e.label for e in reference[latest]):
        out["psi_label"] = psi(Counter(e.label for e in reference[latest]), Counter(e.label for e in recent))
    return out


def recent_examples(config: PipelineConfig, state: StateLayout, champion_dataset: str | None,
                    work_dir: Path) -> tuple[list[ChatExample], str]:
    """The newest labeled examples the champion was not trained on, and where they came from."""
    from tuneloop.core.mapping import required_fields
    from tuneloop.lib.datasets import read_examples
    from tuneloop.lib.gate import check_batch
    from tuneloop.lib.ledger import load_ledger
    from tuneloop.lib.sources import make_source

    ledger = load_ledger(state.ledger)
    landing = getattr(config.source, "landing", None) or state.landing
    raw = make_source(config.source, landing, required_fields(config.mapping)).collect(ledger)
    if raw.files or (raw.sql and raw.sql.n_rows):
        checked = check_batch(raw, config.source, config.mapping, config.quality, work_dir)
        rows = read_examples(checked.accepted_path)
        if rows:
            return rows[-config.drift.window:], f"{len(rows)} accepted records not yet trained on"
    if ledger.dataset_version and ledger.dataset_version != champion_dataset:
        seen = set()
        if champion_dataset and (state.datasets / f"{champion_dataset}.jsonl").exists():
            seen = {e.content_hash for e in read_examples(state.datasets / f"{champion_dataset}.jsonl")}
        newer = [e for e in read_examples(state.datasets / f"{ledger.dataset_version}.jsonl")
                 if e.content_hash not in seen]
        if newer:
            return newer[-config.drift.window:], f"dataset version {ledger.dataset_version} (newer than the champion's)"
    return [], ""


def pyfunc_score(model_uri: str, held: list[HeldOutExample], config: PipelineConfig, tracking_uri: str) -> ModelScore:
    """A registered model (its MLflow pyfunc, whatever the backend) scored on labeled examples, called the way
    a user calls it: with the user's text."""
    import mlflow

    from tuneloop.lib.metrics import parse_label, score

    mlflow.set_tracking_uri(tracking_uri)
    try:
        model = mlflow.pyfunc.load_model(model_uri)
    except ModuleNotFoundError as exc:  # pickled by a tuneloop before the package was named tuneloop
        raise TuneloopError(f"{model_uri} was registered by an older tuneloop ({exc}); retrain and promote a new "
                            "version, or start from a clean state folder") from None
    openai = config.train.openai
    if openai.api_key_secret_block and not os.environ.get(openai.api_key_env):
        # the served model reads its key from the environment; a key kept in a Prefect Secret block is put there
        from tuneloop.lib.credentials import api_key

        os.environ[openai.api_key_env] = api_key(openai)
    answers = model.predict([_user_of(h.prompt) for h in held])
    evaluate = config.evaluate
    if evaluate.task == "classification":  # parsed as evaluate parses them (a label may start any line)
        pattern = re.compile(evaluate.label_pattern, re.MULTILINE)
        return score([parse_label(a, pattern) for a in answers], held)
    judge = None
    if evaluate.judge is not None and evaluate.primary_metric == "judge":  # graded only when it is what is watched
        from tuneloop.lib.answerers import judge_grade

        judge = judge_grade(evaluate.judge, held, answers)
    return score(answers, held, task="generation", judge=judge)


def champion_score(model_uri: str, examples: list[ChatExample], config: PipelineConfig, tracking_uri: str) -> float:
    """The registered champion scored on recent labeled examples, in the primary metric."""
    from tuneloop.lib.heldout import heldout_example

    held = [heldout_example(e, f"{e.source}:{e.line}") for e in examples]
    return pyfunc_score(model_uri, held, config, tracking_uri).metric(config.evaluate.primary_metric)


def note_retirement(report: DriftReport, lineage: Lineage, config: PipelineConfig, today: date | None = None) -> None:
    """When the champion, an API fine-tune, stops answering: put on the report, a warning within warn_days."""
    from tuneloop.core.retirement import champion_warning, version_retirement, within_warning

    found = version_retirement(lineage, config.retirement, config.train.openai.provider)
    if found is None:
        return
    report.champion_model, report.champion_provider = found.model, found.provider
    report.retires_on, report.retirement_days_left = found.on, found.days_left(today)
    if within_warning(found, config.retirement, today):
        report.retirement_warning = champion_warning(report.champion_version, found, config.retirement, today)


def check_drift(config: PipelineConfig, state: StateLayout, registry: ModelRegistry, work_dir: Path,
                today: date | None = None) -> DriftReport:
    from tuneloop.lib.datasets import read_examples

    metric = config.evaluate.primary_metric
    version = registry.champion_version()
    if version is None:
        return DriftReport(metric=metric, note=f"no champion of {registry.model_name} yet: nothing to monitor")
    lineage = Lineage.from_tags(version.tags)
    champion_dataset = lineage.dataset_version
    report = DriftReport(champion_version=str(version.version), champion_dataset_version=champion_dataset,
                         metric=metric)
    note_retirement(report, lineage, config, today)  # before any early return: it matters with no new data
    run = registry.client.get_run(version.run_id)
    # eval/candidate_<metric>; a run logged before metrics were grouped: candidate_<metric>
    report.at_promotion = run.data.metrics.get(score_metric("candidate", metric), run.data.metrics.get(f"candidate_{metric}"))
    recent, origin = recent_examples(config, state, champion_dataset, work_dir)
    report.n_recent, report.recent_from = len(recent), origin
    if len(recent) < config.drift.min_examples:
        report.note = (f"{len(recent)} recent examples (fewer than drift.min_examples = {config.drift.min_examples}):"
                       " no verdict")
        return report

    snapshot = state.snapshot(champion_dataset)
    if not snapshot.exists():
        raise TuneloopError(f"drift: the champion's training snapshot {snapshot} is missing from this state folder")
    reference = read_examples(snapshot)
    report.n_reference = len(reference)
    shifts = input_drift(reference, recent, config.drift.window)
    report.psi_length, report.new_vocabulary_share = shifts["psi_length"], shifts["new_vocabulary_share"]
    report.psi_label = shifts.get("psi_label")

    labeled = [e for e in recent if e.label is not None] if config.evaluate.task == "classification" else recent
    if len(labeled) >= config.drift.min_examples:
        report.recent_value = round(champion_score(f"models:/{registry.model_name}@{CHAMPION}", labeled, config,
                                                   registry.tracking_uri), 4)
        if report.at_promotion is not None:
            report.metric_drop = round(report.at_promotion - report.recent_value, 4)

    d = config.drift
    if report.metric_drop is not None and report.metric_drop > d.max_accuracy_drop:
        report.reasons.append(f"performance: {metric} {report.recent_value:.3f} on {len(labeled)} recent examples, "
                              f"{report.metric_drop:.3f} below {report.at_promotion:.3f} at promotion "
                              f"(drift.max_accuracy_drop {d.max_accuracy_drop})")
    for name, value in (("ticket length", report.psi_length), ("label", report.psi_label)):
        if value is not None and value > d.psi_threshold:
            report.reasons.append(f"input: PSI of {name} distribution {value:.3f} > {d.psi_threshold}")
    if report.new_vocabulary_share > d.vocabulary_threshold:
        report.reasons.append(f"input: {report.new_vocabulary_share:.1%} of recent words never occur in the training "
                              f"data (> {d.vocabulary_threshold:.0%})")
    report.drifted = bool(report.reasons)
    return report


def drift_markdown(report: DriftReport) -> str:
    def f(v):
        return "n/a" if v is None else f"{v:.3f}"

    lines = [f"## Drift check of champion v{report.champion_version or '-'}", "",
             f"**{'DRIFT' if report.drifted else 'no drift'}**" + (f": {report.note}" if report.note else ""), "",
             *([f"**Retirement**: {report.retirement_warning}", ""] if report.retirement_warning else []),
             "| signal | value |", "|---|---|",
             f"| recent examples | {report.n_recent} ({report.recent_from or 'none'}) |",
             f"| {report.metric} at promotion | {f(report.at_promotion)} |",
             f"| {report.metric} on recent data | {f(report.recent_value)} |",
             f"| drop | {f(report.metric_drop)} |",
             f"| PSI ticket length | {f(report.psi_length)} |",
             f"| PSI labels | {f(report.psi_label)} |",
             f"| new vocabulary share | {f(report.new_vocabulary_share)} |"]
    if report.retires_on is not None:
        from tuneloop.core.retirement import relative_days

        lines.append(f"| champion stops answering | {report.retires_on.isoformat()} "
                     f"({relative_days(report.retirement_days_left)}; {report.champion_model} at "
                     f"{report.champion_provider}) |")
    lines += ["", *[f"- {r}" for r in report.reasons]]
    return "\n".join(lines)


def log_drift(report: DriftReport, config: PipelineConfig, registry: ModelRegistry,
              artifacts_dir: Path | None) -> str | None:
    """One MLflow run per champion version, a step per check: the UI charts drift over time."""
    import time

    from mlflow.entities import Metric, RunTag

    if report.champion_version is None:
        return None
    client = registry.client
    exp = registry.experiment_id(config.registry.experiment, artifacts_dir)
    found = client.search_runs([exp], filter_string=(
        f"tags.`tuneloop.kind` = 'drift' and tags.champion_version = '{report.champion_version}'"), max_results=1)
    run_id = found[0].info.run_id if found else client.create_run(
        exp, run_name=f"drift-{registry.model_name}-v{report.champion_version}",
        tags={"tuneloop.kind": "drift", "champion_version": report.champion_version}).info.run_id
    step = len(client.get_metric_history(run_id, "n_recent"))
    now = int(time.time() * 1000)
    values = {"n_recent": report.n_recent, "recent_metric": report.recent_value, "metric_drop": report.metric_drop,
              "psi_length": report.psi_length, "psi_label": report.psi_label,
              "new_vocabulary_share": report.new_vocabulary_share, "drifted": float(report.drifted),
              "retirement_days_left": report.retirement_days_left}
    tags = [RunTag("champion_retires_on", report.retires_on.isoformat())] if report.retires_on else []
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items() if v is not None],
                     tags=tags)
    return run_id
