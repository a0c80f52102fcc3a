"""Distill: the champion as teacher. It answers the records that came without an answer, and its answers
become training targets for the next candidate.

This is how a team moves off an API fine-tune before it stops answering: the API model writes the answers a
local model then learns from, and the evaluation compares the two on the same held-out examples. The
teacher's answers are the "golden outputs" that outlive the API model, so they are kept three ways: in the
generation cache (a stopped run resumes without paying for an answer twice; answers are cached after every
``distill.batch_size``), in ``teacher_answers.jsonl`` in the run folder (logged with the MLflow run), and in
the snapshot, where each example the teacher answered says so in ``answered_by``. An API teacher's cost is
estimated (prompt tokens counted, every answer taken at ``distill.max_new_tokens``) and held to
``train.max_cost_usd`` before the first call.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import orjson
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tuneloop.core.config import PipelineConfig
from tuneloop.core.mapping import content_hash
from tuneloop.core.records import (
    Champion,
    ChatExample,
    CheckedBatch,
    DistillSummary,
    QuarantineEntry,
    TuneloopError,
)
from tuneloop.core.state import unique_temporary
from tuneloop.lib.runlog import stage_logger

# what the demo suite refuses in a body, plus the replacement character a broken decoder leaves
UNPRINTABLE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ufffd]")


def migration_config(config: PipelineConfig) -> PipelineConfig:
    """What ``--migrate`` means: train a local model, with the champion as the teacher of records that lack an
    answer, and let it take over when it is at least as good (a tie is a win: same quality, no API)."""
    return config.model_copy(update={
        "train": config.train.model_copy(update={"backend": "local"}),
        "distill": config.distill.model_copy(update={"teacher": "champion"}),
        "registry": config.registry.model_copy(update={"promote_when": "at_least_as_good"}),
    })


def describe_teacher(champion: Champion) -> str:
    what = champion.fine_tuned_model or f"LoRA on {champion.base_model}"
    return f"champion v{champion.version} ({what})"


def teacher_identity(champion: Champion) -> str:
    """The generation cache's name for the teacher: the same as evaluation's, so an answer is shared."""
    if champion.fine_tuned_model:
        return f"openai:{champion.fine_tuned_model}"
    from tuneloop.core.models import adapter_identity

    return adapter_identity(champion.base_model, champion.adapter_path)


def estimate_teacher_cost(prompts: list[list[dict]], champion: Champion, config: PipelineConfig,
                          home: Path) -> float | None:
    """An upper bound in USD for an API teacher to answer ``prompts``: their tokens at the input price plus
    ``distill.max_new_tokens`` each at the output price. None for a local teacher (it costs no money)."""
    if not champion.fine_tuned_model:
        return None
    if not prompts:
        return 0.0
    from tuneloop.lib.tokens import openai_counter

    openai = config.train.openai
    spec = openai.spec(champion.fine_tuned_model)
    base = openai.base_of(champion.fine_tuned_model)
    if spec.usd_per_1m_input_tokens is None or spec.usd_per_1m_output_tokens is None:
        raise TuneloopError(f"distill: train.openai.models[{base!r}] has no usd_per_1m_input_tokens / "
                            "usd_per_1m_output_tokens, so the teacher's answers cannot be priced against "
                            "train.max_cost_usd: add the fine-tuned model's inference prices")
    tokens_in = sum(openai_counter(champion.fine_tuned_model, openai, home).count(prompts))
    tokens_out = len(prompts) * config.distill.max_new_tokens
    return round(tokens_in / 1e6 * spec.usd_per_1m_input_tokens + tokens_out / 1e6 * spec.usd_per_1m_output_tokens, 4)


def _local_teacher(champion: Champion, batch_size: int) -> Callable[[list], list[str]]:
    """A local champion answers on its own base model, loaded once, on the first batch that needs it."""
    loaded: dict[str, object] = {}

    def produce(examples: list, max_new_tokens: int) -> list[str]:
        from peft import PeftModel

        from tuneloop.core.generation import generate
        from tuneloop.core.models import load_causal_lm, load_tokenizer, quiet_libraries

        if not loaded:
            quiet_libraries()
            loaded["tokenizer"] = load_tokenizer(champion.adapter_path)
            loaded["model"] = PeftModel.from_pretrained(load_causal_lm(champion.base_model), str(champion.adapter_path))
        return generate(loaded["model"], loaded["tokenizer"], examples, max_new_tokens, batch_size)

    return produce


def _teacher(champion: Champion, config: PipelineConfig, warn: Callable[[str], None]):
    if champion.fine_tuned_model:
        from tuneloop.lib.answerers import chat_answers
        from tuneloop.lib.azure_deploy import answering_deployment

        def ask(examples: list, max_new_tokens: int) -> list[str]:
            # on Azure with managed deployments: the champion's deployment (pointed at the champion first)
            model = answering_deployment(config.train.openai, "champion", champion.fine_tuned_model, warn=warn)
            return chat_answers(config.train.openai, model, examples, max_new_tokens, warn)

        return ask
    if champion.adapter_path is None:
        raise TuneloopError(f"distill: champion v{champion.version} has neither an API model nor an adapter to answer with")
    return _local_teacher(champion, config.evaluate.batch_size)


def _read_rows(path: Path) -> list[dict]:
    with path.open("rb") as fh:
        return [orjson.loads(line) for line in fh if line.strip()]


def _append(path: Path, lines: list[bytes]) -> None:
    """Old content + ``lines`` under the same name, atomically (a rerun of the stage never doubles lines)."""
    with unique_temporary(path) as (out, tmp):
        if path.is_file():
            with path.open("rb") as src:
                while chunk := src.read(1 << 20):
                    out.write(chunk)
        out.writelines(lines)
    tmp.replace(path)


def distill(checked: CheckedBatch, champion: Champion | None, config: PipelineConfig, home: Path, run_dir: Path,
            warn: Callable[[str], None] | None = None) -> CheckedBatch:
    """The teacher answers the gate's unlabelled records; each becomes an accepted example (``answered_by`` the
    teacher) or a quarantine entry saying why not. Counts still reconcile: read = accepted + quarantined +
    duplicates."""
    from tuneloop.lib.answerers import GenerationCache
    from tuneloop.lib.metrics import parse_label

    if not checked.n_unlabelled or checked.unlabelled_path is None:
        return checked
    log = stage_logger()
    warn = warn or log.warning
    rows = _read_rows(checked.unlabelled_path)
    quarantine: list[bytes] = []

    def set_aside(row: dict, reason: str) -> None:
        entry = QuarantineEntry(source=row["source"], line=row["line"], reasons=[reason], record=row.get("record"))
        quarantine.append(orjson.dumps(entry.model_dump(), default=str) + b"\n")

    if champion is None:
        for row in rows:
            set_aside(row, "no_teacher: the record has no answer and there is no champion yet to answer it "
                           "(distill.teacher: champion); label it, or land it again after the first promotion")
        _append(checked.quarantine_path, quarantine)
        warn(f"distill: {len(rows)} records without an answer quarantined: there is no champion to answer them")
        done = checked.model_copy(update={"n_quarantined": checked.n_quarantined + len(rows), "n_unlabelled": 0,
                                          "unlabelled_path": None})
        # quality_summary.json agrees with quarantine.jsonl: these records are quarantined, not left for a teacher
        done.summary_path.write_bytes(orjson.dumps(done.model_dump(mode="json", exclude={"summary_path"}),
                                                   option=orjson.OPT_INDENT_2))
        return done

    d = config.distill
    teacher = describe_teacher(champion)
    identity = teacher_identity(champion)
    cache = GenerationCache(home / "generations", d.max_new_tokens, warn)
    examples = [SimpleNamespace(prompt=row["prompt"]) for row in rows]
    todo = cache.missing(identity, examples)
    cost = estimate_teacher_cost([e.prompt for e in todo], champion, config, home)
    budget = config.train.max_cost_usd
    if cost is not None and budget is not None and cost > budget:
        raise TuneloopError(
            f"distill: the teacher ({teacher}) answering {len(todo)} records would cost up to ${cost:,.2f}, over "
            f"train.max_cost_usd ${budget:,.2f} (every answer counted at distill.max_new_tokens {d.max_new_tokens}); "
            f"nothing was sent. Raise the budget, lower distill.max_new_tokens, or land fewer unlabelled records")
    log.info(f"distill: {teacher} answers {len(rows)} records without an answer: {len(rows) - len(todo)} cached, "
             f"{len(todo)} to ask" + (f", estimated at most ${cost:,.4f}" if cost is not None else " (local, no cost)"))
    produce = _teacher(champion, config, warn)
    answers: list[str] = []
    for start in range(0, len(examples), d.batch_size):  # cached batch by batch: a stop loses one batch at most
        answers += cache.answers(identity, examples[start:start + d.batch_size],
                                 lambda batch: produce(batch, d.max_new_tokens))

    pattern = re.compile(config.evaluate.label_pattern, re.MULTILINE)
    labelled = config.mapping.label is not None and config.evaluate.task == "classification"
    accepted: list[bytes] = []
    golden: list[bytes] = []
    for row, answer in zip(rows, answers, strict=True):
        golden.append(orjson.dumps({"record_id": row["record_id"], "source": row["source"], "line": row["line"],
                                    "prompt": row["prompt"], "answer": answer, "teacher": teacher,
                                    "teacher_model": identity}) + b"\n")
        text = answer.strip()
        label = parse_label(text, pattern) if labelled else None
        if not text:
            set_aside(row, f"teacher_answer_empty: {teacher} answered with nothing")
            continue
        if UNPRINTABLE.search(text):  # a garbled reply (control characters, undecodable bytes) is no target
            set_aside(row, f"teacher_answer_garbled: {teacher}'s answer holds control characters or U+FFFD: "
                           f"{text[:80]!r}")
            continue
        if labelled and label is None:
            set_aside(row, f"teacher_answer_unlabelled: {teacher}'s answer has no label matching "
                           f"evaluate.label_pattern {config.evaluate.label_pattern!r}: {text[:80]!r}")
            continue
        messages = [*row["prompt"], {"role": "assistant", "content": text}]
        example = ChatExample(messages=messages, label=label, record_id=row["record_id"], source=row["source"],
                              line=row["line"], content_hash=content_hash(messages),
                              metadata=row.get("metadata") or {}, answered_by=teacher)
        accepted.append(example.model_dump_json(exclude_none=True).encode() + b"\n")

    answers_path = run_dir / "teacher_answers.jsonl"
    answers_path.write_bytes(b"".join(golden))
    _append(checked.accepted_path, accepted)
    _append(checked.quarantine_path, quarantine)
    summary = DistillSummary(teacher=teacher, teacher_model=identity, n_to_answer=len(rows), n_answered=len(accepted),
                             n_quarantined=len(quarantine), n_called=len(todo), n_cached=len(rows) - len(todo),
                             estimated_cost_usd=cost, answers_path=answers_path)
    done = checked.model_copy(update={
        "n_accepted": checked.n_accepted + len(accepted), "n_quarantined": checked.n_quarantined + len(quarantine),
        "n_unlabelled": 0, "unlabelled_path": None, "distilled": summary})
    if not done.reconciles:
        raise RuntimeError(f"records lost in distillation: {done.n_read} read, {done.n_accepted} + "
                           f"{done.n_quarantined} + {done.n_duplicates} accounted for")
    done.summary_path.write_bytes(orjson.dumps(done.model_dump(mode="json", exclude={"summary_path"}),
                                               option=orjson.OPT_INDENT_2))
    return done


def distill_markdown(summary: DistillSummary) -> str:
    cost = "local: no cost" if summary.estimated_cost_usd is None else f"at most ${summary.estimated_cost_usd:,.4f}"
    return "\n".join([
        "## Teacher answers", "", f"Teacher: {summary.teacher}", "",
        "| without an answer | answered (training examples) | set aside | asked now | from the cache | cost |",
        "|---:|---:|---:|---:|---:|---|",
        f"| {summary.n_to_answer} | {summary.n_answered} | {summary.n_quarantined} | {summary.n_called} | "
        f"{summary.n_cached} | {cost} |", "", f"Every prompt and answer: `{summary.answers_path}`"])


@task(name="distill", cache_policy=NO_CACHE)
def distill_task(checked: CheckedBatch, champion: Champion | None, config: PipelineConfig, home: Path,
                 run_dir: Path) -> CheckedBatch:
    from prefect.artifacts import create_markdown_artifact

    done = distill(checked, champion, config, home, run_dir, warn=get_run_logger().warning)
    if done.distilled is not None:
        s = done.distilled
        create_markdown_artifact(distill_markdown(s), key="teacher-answers", description="distillation from the champion")
        get_run_logger().info(f"distill: {s.n_answered} teacher answers became training examples, {s.n_quarantined} "
                              f"set aside; {s.n_called} asked, {s.n_cached} from the cache")
    return done
