"""Metrics: how answers are scored, the same way for every model and for the drift monitor.

Pure and offline (no model, no API, no Prefect): each task its own metrics (classification: labels parsed
from answers, accuracy / macro-F1 / per class, the confusion matrix; generation: exact match / ROUGE-L /
BLEU of the whole answer), the worst answers, and the answer budget sized from the references. The LLM
judge is in ``lib/answerers.py``: it is a model answering, through a paid API.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tuneloop.core.config import EvaluateConfig
from tuneloop.core.records import ModelScore
from tuneloop.lib.heldout import HeldOutExample


def parse_label(text: str, pattern: re.Pattern[str]) -> str | None:
    match = pattern.search(text)
    return match.group(1).strip() if match and match.group(1) is not None else None  # labels are stripped values


def answer_budget(heldout: list[HeldOutExample], evaluate: EvaluateConfig, pattern: re.Pattern[str],
                  counters: list[Callable[[list[str]], list[int]]], warn: Callable[[str], None] | None = None) -> int:
    """How many new tokens every model may answer with: enough to write what the held-out references write.

    A label cut off mid-word is scored wrong, and which labels need more tokens depends on the tokenizer (a
    tiny one spells a new queue name letter by letter), so for classification a configured budget that cannot
    fit the longest reference label is raised to fit, with a warning; unset, it is sized from the references.
    """
    if evaluate.task == "classification":
        texts = [e.expected[:m.end(1)] if (m := pattern.search(e.expected)) else e.expected for e in heldout]
    else:
        texts = [e.expected for e in heldout]
    per_text = [max(n) for n in zip(*(count(texts) for count in counters), strict=True)] if counters else [0]
    longest = max(per_text, default=0)
    needed = longest + 2  # the references' tokens may merge differently in context; and room to stop
    if evaluate.max_new_tokens is None:
        return needed if evaluate.task == "classification" else longest + 1
    if evaluate.task == "classification" and evaluate.max_new_tokens < needed:
        label = heldout[per_text.index(longest)].label
        if warn:
            warn(f"evaluate.max_new_tokens={evaluate.max_new_tokens} cannot fit the label {label!r} of the held-out "
                 f"references ({longest} tokens with this tokenizer): answering with {needed} instead, "
                 "since a cut-off label would be scored wrong")
        return needed
    return evaluate.max_new_tokens


def _normalize(text: str) -> str:
    return " ".join(text.split()).casefold()


def rouge_l(texts: list[str], examples: list[HeldOutExample]) -> list[float]:
    """ROUGE-L F-measure (rouge-score) of each answer against its reference."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return [scorer.score(e.expected, t)["rougeL"].fmeasure for e, t in zip(examples, texts, strict=True)]


def text_scores(texts: list[str], examples: list[HeldOutExample]) -> tuple[float, float, float, list[float]]:
    """Exact match, mean ROUGE-L F-measure, corpus BLEU / 100, and ROUGE-L per example."""
    import sacrebleu

    rouge = rouge_l(texts, examples)
    exact = sum(_normalize(t) == _normalize(e.expected) for e, t in zip(examples, texts, strict=True)) / len(examples)
    bleu = sacrebleu.corpus_bleu(texts, [[e.expected for e in examples]]).score / 100
    return round(exact, 4), round(sum(rouge) / len(rouge), 4), round(bleu, 4), [round(r, 4) for r in rouge]


def score(predicted: list[str | None], examples: list[HeldOutExample], texts: list[str] | None = None,
          task: str = "classification", judge: float | None = None) -> ModelScore:
    """The task's own metrics only; ``predicted``: the labels parsed from the answers (classification) or the
    answers (generation; ``texts`` when given).

    Classification: accuracy, macro-F1 over the expected labels, per-class precision / recall / F1
    (scikit-learn); its answers are sized to end at the label, so exact match or BLEU of them would mean
    nothing. Generation: exact match, ROUGE-L and BLEU of the whole answer, and the judge's grade if any."""
    if task == "generation":
        exact, rouge, bleu, _ = text_scores(texts if texts is not None else [p or "" for p in predicted], examples)
        return ModelScore(n_examples=len(examples), exact_match=exact, rouge_l=rouge, bleu=bleu, judge=judge)
    from sklearn.metrics import precision_recall_fscore_support

    expected = [e.label for e in examples]
    got = [p if p is not None else "<unparsed>" for p in predicted]
    labels = sorted(set(expected))
    p, r, f, support = precision_recall_fscore_support(expected, got, labels=labels, zero_division=0)
    correct = sum(g == e for g, e in zip(got, expected, strict=True))
    return ModelScore(
        accuracy=round(correct / len(examples), 4), n_examples=len(examples),
        n_unparsed=sum(x is None for x in predicted), macro_f1=round(float(f.mean()), 4),
        per_class={lab: {"precision": round(float(p[i]), 4), "recall": round(float(r[i]), 4),
                         "f1": round(float(f[i]), 4), "support": int(support[i])} for i, lab in enumerate(labels)},
    )


def confusion_png(predicted: list[str | None], examples: list[HeldOutExample], title: str, path: Path) -> Path:
    """Rows: expected label; columns: predicted (unparsed answers, and labels no example has, in their own
    columns). No row for what is never expected: an always-zero ``<unparsed>`` row says nothing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np
    from sklearn.metrics import confusion_matrix

    expected = [e.label for e in examples]
    got = [p if p is not None else "<unparsed>" for p in predicted]
    rows = sorted(set(expected))
    labels = rows + sorted(set(got) - set(expected))
    counts = confusion_matrix(expected, got, labels=labels)[:len(rows)]
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.0 * len(rows) + 1.5))
    ax.imshow(counts, cmap="Blues", aspect="auto")
    high = counts.max() / 2 if counts.size else 0
    for (i, j), n in np.ndenumerate(counts):
        ax.text(j, i, str(n), ha="center", va="center", color="white" if n > high else "black")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("Predicted label")
    ax.set_ylabel("True label")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def worst_examples(labels: list[str | None], texts: list[str], heldout: list[HeldOutExample], n: int,
                   task: str = "classification", rouge: list[float] | None = None) -> list[dict]:
    """The worst answers as rows a person can read. Classification: wrong labels, unparsed first (expected and
    predicted label). Generation (``labels`` unused): the lowest ROUGE-L (per example, ``rouge`` or computed
    here), exact matches left out; expected is the reference answer."""
    rows = []
    if task == "generation":
        rouge = rouge if rouge is not None else [round(r, 4) for r in rouge_l(texts, heldout)]
        for e, text, r in zip(heldout, texts, rouge, strict=True):
            if _normalize(text) != _normalize(e.expected):
                rows.append({"record_id": e.record_id, "input": _user(e)[:300], "expected": e.expected[:300],
                             "answer": text[:300], "rouge_l": r})
        rows.sort(key=lambda row: (row["rouge_l"], row["record_id"]))
        return rows[:n]
    for e, label, text in zip(heldout, labels, texts, strict=True):
        if label != e.label:
            rows.append({"record_id": e.record_id, "input": _user(e)[:300], "expected": e.label, "got": label,
                         "answer": text[:300], "unparsed": label is None})
    rows.sort(key=lambda row: (not row["unparsed"], row["record_id"]))
    return rows[:n]


def _user(example: HeldOutExample) -> str:
    return next((m["content"] for m in reversed(example.prompt) if m["role"] == "user"), "")


def training_labels(train_path: Path | None, pattern: re.Pattern[str]) -> list[str]:
    """The labels the training split's answers write (its last assistant message, parsed as answers are)."""
    import orjson

    if train_path is None or not train_path.is_file():
        return []
    labels = []
    with train_path.open("rb") as fh:
        for line in fh:
            if line.strip():
                messages = orjson.loads(line).get("messages") or []
                answer = next((m["content"] for m in reversed(messages) if m.get("role") == "assistant"), "")
                if (label := parse_label(answer, pattern)) is not None:
                    labels.append(label)
    return labels


def majority_baseline(train_labels: list[str], heldout: list[HeldOutExample]) -> tuple[str, ModelScore] | None:
    """Always answering the training split's most common label (the held-out set's, without a training split):
    the floor a classifier must clear before it is called better than guessing."""
    counts = Counter(train_labels or [e.label for e in heldout if e.label is not None])
    if not counts:
        return None
    label = min(counts, key=lambda k: (-counts[k], k))  # the most common; ties by name, so it is reproducible
    return label, score([label] * len(heldout), heldout)


def collapse(predicted: list[str | None], heldout: list[HeldOutExample], share: float | None) -> str | None:
    """Why the answers count as collapsed onto one label, or None.

    Collapsed: one label is at least ``share`` of the answers and at least 25 points more than its share of
    the references (a model that answers 'billing' for 99 of 100 tickets when 16 are billing has learned the
    prior, not the task; on a set that is 95% 'billing', answering it 95% of the time is not a collapse)."""
    if share is None or not predicted:
        return None
    counts = Counter(predicted)
    label, n = max(counts.items(), key=lambda kv: (kv[1], str(kv[0])))
    answered, expected = n / len(predicted), sum(e.label == label for e in heldout) / len(heldout)
    if answered < share or answered - expected < 0.25:
        return None
    shown = "no parsable label" if label is None else repr(label)
    return (f"{shown} for {n} of {len(predicted)} answers ({answered:.0%}); it is {expected:.0%} of the "
            f"references")
