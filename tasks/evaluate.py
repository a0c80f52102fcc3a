"""Evaluate: base, champion and candidate answer the same held-out examples in one run.

All three share one copy of the base weights: the candidate and the champion are LoRA adapters loaded
side by side, and the base is the same model with adapters disabled. Decoding is greedy.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

import orjson
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tuneloop.core.config import EvaluateConfig, JudgeConfig, OpenAITrainConfig
from tuneloop.core.generation import generate
from tuneloop.core.models import adapter_identity, load_causal_lm, load_tokenizer, quiet_libraries
from tuneloop.core.openai_client import chat_completions
from tuneloop.core.records import Champion, EvalReport, ModelScore, TrainedModel, TuneloopError
from tuneloop.tasks.heldout import GOLDEN_PREFIX, HeldOutExample


def parse_label(text: str, pattern: re.Pattern[str]) -> str | None:
    match = pattern.search(text)
    return match.group(1) if match else None


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


def text_scores(texts: list[str], examples: list[HeldOutExample]) -> tuple[float, float, float, list[float]]:
    """Exact match, mean ROUGE-L F-measure (and per example), corpus BLEU / 100."""
    import sacrebleu
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    rouge = [scorer.score(e.expected, t)["rougeL"].fmeasure for e, t in zip(examples, texts, strict=True)]
    exact = sum(_normalize(t) == _normalize(e.expected) for e, t in zip(examples, texts, strict=True)) / len(examples)
    bleu = sacrebleu.corpus_bleu(texts, [[e.expected for e in examples]]).score / 100
    return round(exact, 4), round(sum(rouge) / len(rouge), 4), round(bleu, 4), rouge


def score(predicted: list[str | None], examples: list[HeldOutExample], texts: list[str] | None = None,
          task: str = "classification", judge: float | None = None) -> ModelScore:
    """Classification: accuracy, macro-F1 over the expected labels, per-class precision / recall / F1
    (scikit-learn). Every task: exact match, ROUGE-L and BLEU of the whole answer when texts are given."""
    text = dict(zip(("exact_match", "rouge_l", "bleu"), text_scores(texts, examples)[:3], strict=True)) if texts else {}
    if task == "generation":
        return ModelScore(accuracy=text.get("exact_match", 0.0), n_examples=len(examples), n_unparsed=0, judge=judge,
                          **text)
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
        judge=judge, **text,
    )


def judge_grade(judge: JudgeConfig, examples: list[HeldOutExample], answers: list[str]) -> float:
    """Mean grade (1..5 scaled to 0..1) an LLM judge gives the answers against the references; a reply
    without a grade counts as the lowest."""
    cfg = OpenAITrainConfig(provider="compatible" if judge.base_url else "openai", base_url=judge.base_url,
                            api_key_env=judge.api_key_env, eval_concurrency=judge.concurrency)
    prompts = []
    for e, a in zip(examples, answers, strict=True):
        question = next((m["content"] for m in reversed(e.prompt) if m["role"] == "user"), "")
        prompts.append([{"role": "system", "content": judge.rubric},
                        {"role": "user", "content": f"Question:\n{question}\n\nReference answer:\n{e.expected}"
                                                    f"\n\nAnswer to grade:\n{a}"}])
    grades = []
    for reply in chat_completions(cfg, judge.model, prompts, max_tokens=4):
        m = re.search(r"[1-5]", reply)
        grades.append((int(m.group(0)) - 1) / 4 if m else 0.0)
    return round(sum(grades) / len(grades), 4)


def confusion_png(predicted: list[str | None], examples: list[HeldOutExample], title: str, path: Path) -> Path:
    """Rows: expected label; columns: predicted (unparsed answers in their own column)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    expected = [e.label for e in examples]
    got = [p if p is not None else "<unparsed>" for p in predicted]
    labels = sorted(set(expected)) + sorted(set(got) - set(expected))
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 2, 1.0 * len(labels) + 1.5))
    ConfusionMatrixDisplay.from_predictions(expected, got, labels=labels, ax=ax, colorbar=False,
                                            xticks_rotation=45)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def chat_answers(openai: OpenAITrainConfig, model: str, examples: list[HeldOutExample], max_new_tokens: int,
                 warn: Callable[[str], None] | None = None) -> list[str]:
    """An API model's answers; the key from the Prefect Secret block or the environment, as in training."""
    from tuneloop.tasks.train_openai import api_key

    return chat_completions(openai, model, [e.prompt for e in examples], max_new_tokens, key=api_key(openai), warn=warn)


class GenerationCache:
    """Answers kept per (model identity, prompt, decoding settings) in the state folder: a champion that
    was scored on these examples before is not run again, locally or through a paid API."""

    def __init__(self, folder: Path | None, max_new_tokens: int):
        self.folder, self.max_new_tokens = folder, max_new_tokens
        self.hits = self.misses = 0

    def key(self, e: HeldOutExample) -> str:
        return hashlib.sha256(orjson.dumps([e.prompt, self.max_new_tokens])).hexdigest()[:24]

    def answers(self, identity: str, examples: list[HeldOutExample],
                produce: Callable[[list[HeldOutExample]], list[str]]) -> list[str]:
        if self.folder is None:
            return produce(examples)
        path = self.folder / f"{hashlib.sha256(identity.encode()).hexdigest()[:24]}.jsonl"
        known: dict[str, str] = {}
        if path.is_file():
            for line in path.read_bytes().splitlines():
                row = orjson.loads(line)
                known[row["k"]] = row["a"]
        missing = [e for e in examples if self.key(e) not in known]
        self.hits += len(examples) - len(missing)
        self.misses += len(missing)
        if missing:
            new = produce(missing)
            self.folder.mkdir(parents=True, exist_ok=True)
            with path.open("ab") as fh:
                for e, a in zip(missing, new, strict=True):
                    known[self.key(e)] = a
                    fh.write(orjson.dumps({"k": self.key(e), "a": a, "model": identity}) + b"\n")
        return [known[self.key(e)] for e in examples]


def _local_answers(trained: TrainedModel, champion: Champion | None, heldout: list[HeldOutExample],
                   evaluate: EvaluateConfig, cache: GenerationCache) -> dict[str, list[str]]:
    """Base, candidate and a local champion share one copy of the base weights (adapters side by side)."""
    from peft import PeftModel

    tokenizer = load_tokenizer(trained.adapter_path)
    base = load_causal_lm(trained.base_model)
    model = PeftModel.from_pretrained(base, str(trained.adapter_path), adapter_name="candidate")
    texts: dict[str, list[str]] = {}

    def with_adapter(name: str | None):
        def produce(examples: list[HeldOutExample]) -> list[str]:
            if name is None:
                with model.disable_adapter():
                    return generate(model, tokenizer, examples, evaluate.max_new_tokens, evaluate.batch_size)
            model.set_adapter(name)
            return generate(model, tokenizer, examples, evaluate.max_new_tokens, evaluate.batch_size)
        return produce

    texts["base"] = cache.answers(f"base:{trained.base_model}", heldout, with_adapter(None))
    texts["candidate"] = cache.answers(adapter_identity(trained.base_model, trained.adapter_path), heldout,
                                       with_adapter("candidate"))
    if champion is not None and champion.adapter_path is not None and champion.fine_tuned_model is None:
        identity = adapter_identity(champion.base_model, champion.adapter_path)
        if champion.base_model == trained.base_model:
            def champion_answers(examples):
                if "champion" not in model.peft_config:
                    model.load_adapter(str(champion.adapter_path), adapter_name="champion")
                return with_adapter("champion")(examples)
        else:  # a champion on another base model is scored on its own base
            def champion_answers(examples):
                other = PeftModel.from_pretrained(load_causal_lm(champion.base_model), str(champion.adapter_path))
                return generate(other, load_tokenizer(champion.adapter_path), examples,
                                evaluate.max_new_tokens, evaluate.batch_size)
        texts["champion"] = cache.answers(identity, heldout, champion_answers)
    return texts


def worst_examples(labels: list[str | None], texts: list[str], heldout: list[HeldOutExample], n: int,
                   task: str = "classification") -> list[dict]:
    """The worst answers as rows a person can read: wrong labels (unparsed first) for classification,
    the lowest ROUGE-L for generation."""
    rows = []
    rouge = text_scores(texts, heldout)[3] if task == "generation" else [0.0] * len(heldout)
    for e, label, text, r in zip(heldout, labels, texts, rouge, strict=True):
        if task == "classification" and label == e.label:
            continue
        if task == "generation" and _normalize(text) == _normalize(e.expected):
            continue
        user = next((m["content"] for m in reversed(e.prompt) if m["role"] == "user"), "")
        rows.append({"record_id": e.record_id, "input": user[:300], "expected": e.label or e.expected[:300],
                     "got": label, "answer": text[:300], "unparsed": label is None, "rouge_l": round(r, 4)})
    rows.sort(key=lambda r: (r["rouge_l"], r["record_id"]) if task == "generation" else (not r["unparsed"], r["record_id"]))
    return rows[:n]


def evaluate_models(
    trained: TrainedModel, champion: Champion | None, heldout: list[HeldOutExample],
    evaluate: EvaluateConfig, run_dir: Path, openai: OpenAITrainConfig | None = None,
    cache_dir: Path | None = None, warn: Callable[[str], None] | None = None,
) -> EvalReport:
    if evaluate.task == "classification" and any(e.label is None for e in heldout):
        raise TuneloopError("evaluate: held-out examples need a label (mapping.label) for classification; "
                            "or set evaluate.task: generation")
    pattern = re.compile(evaluate.label_pattern, re.MULTILINE)
    counters: list[Callable[[list[str]], list[int]]] = []
    if trained.backend == "local" or (champion is not None and champion.adapter_path is not None):
        tokenizer = load_tokenizer(trained.adapter_path or champion.adapter_path)
        counters.append(lambda texts: [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]])
    if trained.backend == "openai" or (champion is not None and champion.fine_tuned_model):
        counters.append(lambda texts: [len(t.encode()) for t in texts])  # an API tokenizer: at most a token a byte
    evaluate = evaluate.model_copy(update={"max_new_tokens": answer_budget(heldout, evaluate, pattern, counters, warn)})
    cache = GenerationCache(cache_dir, evaluate.max_new_tokens)

    def api(model: str) -> list[str]:
        return cache.answers(f"openai:{model}", heldout,
                             lambda exs: chat_answers(openai, model, exs, evaluate.max_new_tokens, warn))

    if trained.backend == "openai":
        texts = {"base": api(trained.base_model), "candidate": api(trained.fine_tuned_model)}
        if champion is not None and champion.adapter_path is not None and champion.fine_tuned_model is None:
            local = TrainedModel(backend="local", base_model=champion.base_model, adapter_path=champion.adapter_path,
                                 dataset_version="", steps=0, train_loss=None, train_seconds=0)
            texts["champion"] = _local_answers(local, None, heldout, evaluate, cache)["candidate"]
    else:
        quiet_libraries()
        texts = _local_answers(trained, champion, heldout, evaluate, cache)
    if champion is not None and champion.fine_tuned_model:  # an API champion answers through the API
        if openai is None:
            raise TuneloopError(f"evaluate: champion v{champion.version} is {champion.fine_tuned_model}: "
                                "set train.openai to reach it")
        texts["champion"] = api(champion.fine_tuned_model)

    labels = {name: [parse_label(t, pattern) for t in outs] for name, outs in texts.items()}
    errors = {}
    for name, predicted in labels.items():
        if evaluate.task == "classification":
            confusion_png(predicted, heldout, f"{name}: expected (rows) vs predicted", run_dir / f"confusion_{name}.png")
        errors[name] = worst_examples(predicted, texts[name], heldout, evaluate.n_worst, evaluate.task)
    judged = {name: judge_grade(evaluate.judge, heldout, outs) for name, outs in texts.items()} if evaluate.judge else {}
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
