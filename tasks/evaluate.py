"""Evaluate: base, champion and candidate answer the same held-out examples in one run, scored the same way.

This stage composes: the answers come from ``tasks.answerers``, the scores from ``tasks.metrics``; here the
answer budget is set, and the predictions, worst answers, confusion matrices and comparison table written.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import orjson
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tuneloop.core.config import EvaluateConfig, OpenAITrainConfig
from tuneloop.core.records import Champion, EvalReport, TrainedModel, TuneloopError
from tuneloop.tasks.answerers import GenerationCache, heldout_answers, judge_grade, token_counters
from tuneloop.tasks.heldout import GOLDEN_PREFIX, HeldOutExample
from tuneloop.tasks.metrics import answer_budget, confusion_png, parse_label, score, worst_examples


def evaluate_models(
    trained: TrainedModel, champion: Champion | None, heldout: list[HeldOutExample],
    evaluate: EvaluateConfig, run_dir: Path, openai: OpenAITrainConfig | None = None,
    cache_dir: Path | None = None, warn: Callable[[str], None] | None = None,
) -> EvalReport:
    if evaluate.task == "classification" and any(e.label is None for e in heldout):
        raise TuneloopError("evaluate: held-out examples need a label (mapping.label) for classification; "
                            "or set evaluate.task: generation")
    pattern = re.compile(evaluate.label_pattern, re.MULTILINE)
    budget = answer_budget(heldout, evaluate, pattern, token_counters(trained, champion), warn)
    evaluate = evaluate.model_copy(update={"max_new_tokens": budget})
    cache = GenerationCache(cache_dir, evaluate.max_new_tokens)
    texts = heldout_answers(trained, champion, heldout, evaluate, openai, cache, warn)
    labels = {name: [parse_label(t, pattern) for t in outs] for name, outs in texts.items()}
    errors = {}
    for name, predicted in labels.items():
        if evaluate.task == "classification":
            confusion_png(predicted, heldout, f"{name}: expected (rows) vs predicted", run_dir / f"confusion_{name}.png")
        errors[name] = worst_examples(predicted, texts[name], heldout, evaluate.n_worst, evaluate.task)
    judged = ({name: judge_grade(evaluate.judge, heldout, outs, warn) for name, outs in texts.items()}
              if evaluate.judge else {})
    scores = {name: score(labels[name], heldout, texts[name], evaluate.task, judged.get(name)) for name in texts}
    (run_dir / "worst_examples.json").write_bytes(orjson.dumps(errors, option=orjson.OPT_INDENT_2))
    predictions_path = run_dir / "predictions.jsonl"
    with predictions_path.open("wb") as fh:
        for i, e in enumerate(heldout):
            row = {"record_id": e.record_id, "expected": e.label}
            row.update({name: {"label": labels[name][i], "text": texts[name][i]} for name in texts})
            fh.write(orjson.dumps(row) + b"\n")
    return EvalReport(
        n_examples=len(heldout),
        base=scores["base"],
        candidate=scores["candidate"],
        champion=scores.get("champion"),
        champion_version=champion.version if champion else None,
        predictions_path=predictions_path,
        worst=errors,
        n_golden=sum(e.record_id.startswith(GOLDEN_PREFIX) for e in heldout),
        cached_answers=cache.hits,
        max_new_tokens=evaluate.max_new_tokens,
    )


def comparison_markdown(report: EvalReport) -> str:
    rows = [("base", report.base), ("champion" + (f" (v{report.champion_version})" if report.champion_version else ""),
                                      report.champion), ("candidate", report.candidate)]
    lines = [f"## Evaluation on {report.n_examples} held-out examples", "",
             "| model | accuracy | macro-F1 | exact match | ROUGE-L | BLEU | judge | unparsed answers |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in rows:
        judge = f"{s.judge:.3f}" if s and s.judge is not None else ""
        lines.append(f"| {name} | {s.accuracy:.3f} | {s.macro_f1:.3f} | {s.exact_match:.3f} | {s.rouge_l:.3f} |"
                     f" {s.bleu:.3f} | {judge} | {s.n_unparsed} |" if s else f"| {name} | none yet | | | | | | |")
    worst = report.worst.get("candidate", [])[:5]
    if worst:
        lines += ["", "Candidate's worst answers:", "", "| record | expected | got | answer |", "|---|---|---|---|"]
        lines += [f"| {w['record_id']} | {w['expected']} | {w['got'] or '(unparsed)'} | "
                  f"{w['answer'][:80].replace('|', '/').replace(chr(10), ' ')} |" for w in worst]
    c = report.candidate
    lines += ["", "Candidate per class:", "", "| label | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
    lines += [f"| {lab} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
              for lab, m in c.per_class.items()]
    return "\n".join(lines)


@task(name="evaluate", cache_policy=NO_CACHE)
def evaluate_task(trained: TrainedModel, champion: Champion | None, heldout: list[HeldOutExample],
                  evaluate: EvaluateConfig, run_dir: Path, openai: OpenAITrainConfig | None = None,
                  cache_dir: Path | None = None) -> EvalReport:
    report = evaluate_models(trained, champion, heldout, evaluate, run_dir, openai, cache_dir,
                             warn=get_run_logger().warning)
    create_markdown_artifact(comparison_markdown(report), key="evaluation", description="base vs champion vs candidate")
    champ = f", champion {report.champion.accuracy:.3f}" if report.champion else ""
    get_run_logger().info(f"evaluate: base {report.base.accuracy:.3f}{champ}, candidate {report.candidate.accuracy:.3f}"
          f" on {report.n_examples} held-out examples (answers of up to {report.max_new_tokens} tokens)")
    return report
