"""Evaluate: base, champion and candidate answer the same held-out examples in one run, scored the same way.

This stage composes: the answers come from ``lib/answerers.py``, the scores from ``lib/metrics.py``; here the
answer budget is set, and the predictions, worst answers, confusion matrices (classification) and comparison
table written, each in the task's own metrics.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from datetime import date
from pathlib import Path

import orjson
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tuneloop.core.config import EvaluateConfig, OpenAITrainConfig, RetirementConfig
from tuneloop.core.records import METRIC_TITLES, Champion, EvalReport, TrainedModel, TuneloopError
from tuneloop.core.retirement import Retirement, retirement_of, training_closes_note, within_warning
from tuneloop.lib.answerers import GenerationCache, heldout_answers, judge_grade, token_counters
from tuneloop.lib.fewshot import prompted_baseline
from tuneloop.lib.heldout import GOLDEN_PREFIX, HeldOutExample
from tuneloop.lib.metrics import (
    answer_budget,
    collapse,
    confusion_png,
    majority_baseline,
    parse_label,
    rouge_l,
    score,
    training_labels,
    worst_examples,
)


def evaluate_models(
    trained: TrainedModel, champion: Champion | None, heldout: list[HeldOutExample],
    evaluate: EvaluateConfig, run_dir: Path, openai: OpenAITrainConfig | None = None,
    cache_dir: Path | None = None, warn: Callable[[str], None] | None = None, train_path: Path | None = None,
) -> EvalReport:
    """Every model answers; each is scored in the task's metrics only, and the files written hold nothing
    else (a generation run has no labels, no confusion matrix, no per-class table). Classification also
    scores the majority-class baseline (the most common label of ``train_path``, the exported training
    split) and says whether the candidate collapsed onto one label."""
    classification = evaluate.task == "classification"
    if classification and any(e.label is None for e in heldout):
        raise TuneloopError("evaluate: held-out examples need a label (mapping.label) for classification; "
                            "or set evaluate.task: generation")
    pattern = re.compile(evaluate.label_pattern, re.MULTILINE)
    budget = answer_budget(heldout, evaluate, pattern, token_counters(trained, champion), warn)
    evaluate = evaluate.model_copy(update={"max_new_tokens": budget})
    cache = GenerationCache(cache_dir, evaluate.max_new_tokens, warn)
    baseline = prompted_baseline(train_path, evaluate.few_shot, evaluate.task, pattern)
    texts = heldout_answers(trained, champion, heldout, evaluate, openai, cache, warn, baseline)
    if classification:
        labels = {name: [parse_label(t, pattern) for t in outs] for name, outs in texts.items()}
        for name, predicted in labels.items():
            confusion_png(predicted, heldout, f"{name}: expected (rows) vs predicted", run_dir / f"confusion_{name}.png")
        scores = {name: score(labels[name], heldout) for name in texts}
        errors = {name: worst_examples(labels[name], texts[name], heldout, evaluate.n_worst) for name in texts}
        rows = [{"record_id": e.record_id, "expected": e.label,
                 **{name: {"label": labels[name][i], "text": texts[name][i]} for name in texts}}
                for i, e in enumerate(heldout)]
        majority = majority_baseline(training_labels(train_path, pattern), heldout)
        collapsed = collapse(labels["candidate"], heldout, evaluate.collapse_share)
    else:
        majority, collapsed = None, None
        judged = ({name: judge_grade(evaluate.judge, heldout, outs, warn) for name, outs in texts.items()}
                  if evaluate.judge else {})
        rouge = {name: [round(r, 4) for r in rouge_l(outs, heldout)] for name, outs in texts.items()}
        scores = {name: score(outs, heldout, task="generation", judge=judged.get(name)) for name, outs in texts.items()}
        errors = {name: worst_examples([], outs, heldout, evaluate.n_worst, "generation", rouge[name])
                  for name, outs in texts.items()}
        rows = [{"record_id": e.record_id, "expected": e.expected,
                 **{name: {"text": texts[name][i], "rouge_l": rouge[name][i]} for name in texts}}
                for i, e in enumerate(heldout)]
    (run_dir / "worst_examples.json").write_bytes(orjson.dumps(errors, option=orjson.OPT_INDENT_2))
    predictions_path = run_dir / "predictions.jsonl"
    predictions_path.write_bytes(b"".join(orjson.dumps(row) + b"\n" for row in rows))
    return EvalReport(
        task=evaluate.task,
        n_examples=len(heldout),
        base=scores["base"],
        candidate=scores["candidate"],
        champion=scores.get("champion"),
        prompted=scores.get("prompted"),
        n_shots=max(baseline.used, default=0) if baseline is not None and "prompted" in texts else 0,
        n_shots_min=min(baseline.used, default=0) if baseline is not None and "prompted" in texts else None,
        champion_version=champion.version if champion else None,
        predictions_path=predictions_path,
        worst=errors,
        n_golden=sum(e.record_id.startswith(GOLDEN_PREFIX) for e in heldout),
        cached_answers=cache.hits,
        max_new_tokens=evaluate.max_new_tokens,
        majority=majority[1] if majority else None,
        majority_label=majority[0] if majority else None,
        collapse=collapsed,
    )


def _cell(text: str, width: int = 80) -> str:
    return text[:width].replace("|", "/").replace("\n", " ")


def api_retirements(trained: TrainedModel, champion: Champion | None, provider: str | None,
                    retirement: RetirementConfig) -> dict[str, Retirement]:
    """The champion and candidate that are API fine-tunes with a retirement date, by role (``provider``: the
    configured API's, train.openai.provider)."""
    found = {}
    for role, model in (("champion", champion), ("candidate", trained)):
        if model is not None and model.is_api_model:
            when = retirement_of(model.fine_tuned_model or model.base_model, provider, retirement)
            if when is not None:
                found[role] = when
    return found


def retirement_lines(retirements: Mapping[str, Retirement], retirement: RetirementConfig | None = None,
                     today: date | None = None) -> list[str]:
    """A line per API-backed champion or candidate: a model that wins here still stops answering then."""
    lines = []
    for role, when in retirements.items():
        note = training_closes_note(when.provider, retirement, today) if retirement and role == "candidate" else ""
        lines.append(f"- {role} `{when.model}` ({when.provider}) {when.describe(today)}" + (f"; {note}" if note else ""))
    return ["", "Retirement:", "", *lines] if lines else []


def comparison_markdown(report: EvalReport, retirements: Mapping[str, Retirement] | None = None,
                        retirement: RetirementConfig | None = None, today: date | None = None) -> str:
    """The Prefect artifact: the task's metrics for the models and the majority-class baseline, the candidate's
    worst answers,
    (classification) its per-class table, and when an API-backed champion or candidate stops answering."""
    names = list(report.candidate.metrics)
    classification = report.task == "classification"
    columns = [METRIC_TITLES[m] for m in names] + (["unparsed answers"] if classification else [])
    majority = [(f"majority class (always `{report.majority_label}`)", report.majority)] if report.majority else []
    shots = (f"{report.n_shots} examples in the prompt" if report.n_shots_min in (None, report.n_shots) else
             f"{report.n_shots_min} to {report.n_shots} examples in the prompt; long prompts had room for fewer")
    prompted = [(f"prompted base ({shots})", report.prompted)] if report.prompted else []
    rows = [("base", report.base), *prompted, *majority,
            ("champion" + (f" (v{report.champion_version})" if report.champion_version else ""), report.champion),
            ("candidate", report.candidate)]
    lines = [f"## Evaluation on {report.n_examples} held-out examples ({report.task})", "",
             "| model | " + " | ".join(columns) + " |", "|---|" + "---:|" * len(columns)]
    for name, s in rows:
        if s is None:
            lines.append(f"| {name} | none yet |" + " |" * (len(columns) - 1))
            continue
        cells = [f"{s.metrics[m]:.3f}" if m in s.metrics else "" for m in names]
        lines.append(f"| {name} | " + " | ".join(cells + ([str(s.n_unparsed)] if classification else [])) + " |")
    if report.collapse:
        lines += ["", f"**The candidate collapsed onto one label**: {report.collapse}."]
    worst = report.worst.get("candidate", [])[:5]
    if worst and classification:
        lines += ["", "Candidate's worst answers:", "", "| record | expected | got | answer |", "|---|---|---|---|"]
        lines += [f"| {w['record_id']} | {w['expected']} | {w['got'] or '(unparsed)'} | {_cell(w['answer'])} |"
                  for w in worst]
    elif worst:
        lines += ["", "Candidate's worst answers (lowest ROUGE-L):", "", "| record | ROUGE-L | expected | answer |",
                  "|---|---:|---|---|"]
        lines += [f"| {w['record_id']} | {w['rouge_l']:.3f} | {_cell(w['expected'])} | {_cell(w['answer'])} |"
                  for w in worst]
    if classification and report.candidate.per_class:
        lines += ["", "Candidate per class:", "", "| label | precision | recall | F1 | support |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {lab} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {int(m['support'])} |"
                  for lab, m in report.candidate.per_class.items()]
    lines += retirement_lines(retirements or {}, retirement, today)
    return "\n".join(lines)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(trained: TrainedModel, champion: Champion | None, heldout: list[HeldOutExample],
                  evaluate: EvaluateConfig, run_dir: Path, openai: OpenAITrainConfig | None = None,
                  cache_dir: Path | None = None, retirement: RetirementConfig | None = None,
                  train_path: Path | None = None) -> EvalReport:
    report = evaluate_models(trained, champion, heldout, evaluate, run_dir, openai, cache_dir,
                             warn=get_run_logger().warning, train_path=train_path)
    retirements = (api_retirements(trained, champion, (openai or OpenAITrainConfig()).provider, retirement)
                   if retirement else {})
    create_markdown_artifact(comparison_markdown(report, retirements, retirement), key="evaluation",
                             description="base, its prompted and majority-class baselines, champion, candidate")
    for role, when in retirements.items():
        if within_warning(when, retirement):
            get_run_logger().warning(f"evaluate: the {role} {when.model} ({when.provider}) {when.describe()}")
    m = evaluate.primary_metric
    champ = f", champion {report.champion.metric(m):.3f}" if report.champion else ""
    majority = f", majority class {report.majority.metric(m):.3f}" if report.majority else ""
    majority += f", prompted base {report.prompted.metric(m):.3f}" if report.prompted else ""
    get_run_logger().info(f"evaluate: {m} of base {report.base.metric(m):.3f}{champ}{majority}, candidate "
                          f"{report.candidate.metric(m):.3f} on {report.n_examples} held-out examples "
                          f"(answers of up to {report.max_new_tokens} tokens)")
    if report.collapse:
        get_run_logger().warning(f"evaluate: the candidate collapsed onto one label: {report.collapse}")
    return report
