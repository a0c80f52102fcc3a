"""Answerers: how each model (base, champion, candidate, and the LLM judge) answers held-out prompts.

Local models share one copy of the base weights: the candidate and a local champion are LoRA adapters
loaded side by side, and the base is the same model with adapters disabled. API models answer through
``chat.completions`` with the training key. Decoding is greedy, and every answer goes through
``GenerationCache``, so no model is asked the same prompt twice, locally or through a paid API. The judge
is here, not in ``lib/metrics.py``, because it is a model answering through an API.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from functools import singledispatch
from pathlib import Path

import orjson

from tuneloop.core.config import ApiClientConfig, EvaluateConfig, JudgeConfig, OpenAITrainConfig
from tuneloop.core.generation import generate
from tuneloop.core.models import adapter_identity, load_causal_lm, load_tokenizer, quiet_libraries
from tuneloop.core.openai_client import chat_completions
from tuneloop.core.records import ApiModel, Champion, LocalAdapter, TrainedModel, TuneloopError
from tuneloop.lib.azure_deploy import (
    answering_deployment,
    candidate_deployment,
    clear_earlier_candidates,
    deployments_of,
)
from tuneloop.lib.fewshot import PromptedBaseline
from tuneloop.lib.heldout import HeldOutExample
from tuneloop.lib.runlog import stage_logger


def chat_answers(openai: OpenAITrainConfig, model: str, examples: list[HeldOutExample], max_new_tokens: int,
                 warn: Callable[[str], None] | None = None) -> list[str]:
    """An API model's answers; the key from the Prefect Secret block or the environment, as in training."""
    from tuneloop.lib.credentials import api_key

    return chat_completions(openai, model, [e.prompt for e in examples], max_new_tokens, key=api_key(openai), warn=warn)


class GenerationCache:
    """Answers kept per (model identity, prompt, decoding settings) in the state folder: a champion that
    was scored on these examples before is not run again, locally or through a paid API.

    One JSON line per answer, appended. A kill can cut the last line mid-way and a disk can garble one: such
    a line is dropped (its answer is generated again) and the file set right at the next append, never a
    traceback. Appends hold a lock on the folder and go out in one ``write``, so two runs appending at once
    cannot interleave their lines.
    """

    LOCK = ".append.lock"

    def __init__(self, folder: Path | None, max_new_tokens: int, warn: Callable[[str], None] | None = None):
        self.folder, self.max_new_tokens = folder, max_new_tokens
        self.warn = warn or stage_logger().warning
        self.hits = self.misses = 0

    def key(self, e: HeldOutExample) -> str:
        return hashlib.sha256(orjson.dumps([e.prompt, self.max_new_tokens])).hexdigest()[:24]

    def missing(self, identity: str, examples: list) -> list:
        """The examples this model has no cached answer for: what asking it would cost (distillation's budget)."""
        if self.folder is None:
            return list(examples)
        known, _ = _read_cache(self.folder / f"{hashlib.sha256(identity.encode()).hexdigest()[:24]}.jsonl", self.warn)
        return [e for e in examples if self.key(e) not in known]

    def answers(self, identity: str, examples: list[HeldOutExample],
                produce: Callable[[list[HeldOutExample]], list[str]]) -> list[str]:
        if self.folder is None:
            return produce(examples)
        path = self.folder / f"{hashlib.sha256(identity.encode()).hexdigest()[:24]}.jsonl"
        known, damaged = _read_cache(path, self.warn)
        missing = [e for e in examples if self.key(e) not in known]
        self.hits += len(examples) - len(missing)
        self.misses += len(missing)
        if missing or damaged:
            new = produce(missing) if missing else []
            rows = []
            for e, a in zip(missing, new, strict=True):
                known[self.key(e)] = a
                rows.append(orjson.dumps({"k": self.key(e), "a": a, "model": identity}) + b"\n")
            _append_cache(path, b"".join(rows), self.folder / self.LOCK)
        return [known[self.key(e)] for e in examples]


def _cache_lines(data: bytes) -> tuple[dict[str, str], list[int], bool]:
    """The answers in a cache file's bytes, the (1-based) numbers of lines that are not entries, and whether
    the last line was cut short (no newline: a kill while it was appended)."""
    lines = data.split(b"\n")
    torn = bool(lines[-1])
    known: dict[str, str] = {}
    garbled: list[int] = []
    for number, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            row = orjson.loads(line)
            known[row["k"]] = row["a"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            garbled.append(number)
    return known, garbled, torn


def _read_cache(path: Path, warn: Callable[[str], None]) -> tuple[dict[str, str], bool]:
    """The answers cached in ``path``, and whether the file needs setting right (a line was dropped)."""
    if not path.is_file():
        return {}, False
    known, garbled, torn = _cache_lines(path.read_bytes())
    if torn:
        warn(f"generation cache {path}: dropped an incomplete last line (a run was stopped while writing it); "
             "that answer is generated again")
    if garbled:
        shown = ", ".join(str(n) for n in garbled[:5]) + (" ..." if len(garbled) > 5 else "")
        warn(f"generation cache {path}: skipped {len(garbled)} unreadable line(s) (line {shown}); "
             "those answers are generated again")
    return known, bool(torn or garbled)


def _append_cache(path: Path, rows: bytes, lock_path: Path) -> None:
    """Append whole lines under the folder's lock; a file holding a torn or garbled line is first rewritten
    without it (temp + rename), so the damage is reported once, not on every later run."""
    import os

    from filelock import FileLock

    from tuneloop.core.state import write_atomically

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(lock_path):
        data = path.read_bytes() if path.is_file() else b""
        _, garbled, torn = _cache_lines(data)
        if torn or garbled:  # read again under the lock: another run may have set it right meanwhile
            bad = set(garbled)
            lines = data.split(b"\n")[:-1]
            kept = b"".join(line + b"\n" for n, line in enumerate(lines, 1) if n not in bad and line.strip())
            write_atomically(path, kept + rows)
            return
        if not rows:
            return
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            view = memoryview(rows)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)


def local_answers(base_model: str, adapter_path: Path, champion: Champion | None, heldout: list[HeldOutExample],
                  evaluate: EvaluateConfig, cache: GenerationCache,
                  baseline: PromptedBaseline | None = None) -> dict[str, list[str]]:
    """Base, an adapter (the candidate) and a local champion share one copy of the base weights (adapters side
    by side); ``baseline``: the base asked with the label set and solved examples too (``prompted``)."""
    from peft import PeftModel

    tokenizer = load_tokenizer(adapter_path)
    base = load_causal_lm(base_model)
    model = PeftModel.from_pretrained(base, str(adapter_path), adapter_name="candidate")
    texts: dict[str, list[str]] = {}

    def with_adapter(name: str | None):
        def produce(examples: list[HeldOutExample]) -> list[str]:
            if name is None:
                with model.disable_adapter():
                    return generate(model, tokenizer, examples, evaluate.max_new_tokens, evaluate.batch_size)
            model.set_adapter(name)
            return generate(model, tokenizer, examples, evaluate.max_new_tokens, evaluate.batch_size)
        return produce

    texts["base"] = cache.answers(f"base:{base_model}", heldout, with_adapter(None))
    if baseline is not None:
        context = getattr(base.config, "max_position_embeddings", None) or 10**9

        def fits(messages: list[dict]) -> bool:
            rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return len(tokenizer(rendered, add_special_tokens=False)["input_ids"]) + evaluate.max_new_tokens <= context

        texts["prompted"] = cache.answers(f"base:{base_model}", baseline.prompts(heldout, fits), with_adapter(None))
    texts["candidate"] = cache.answers(adapter_identity(base_model, adapter_path), heldout,
                                       with_adapter("candidate"))
    if champion is not None and champion.adapter_path is not None and champion.fine_tuned_model is None:
        identity = adapter_identity(champion.base_model, champion.adapter_path)
        if champion.base_model == base_model:
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


def token_counters(trained: TrainedModel, champion: Champion | None) -> list[Callable[[list[str]], list[int]]]:
    """How the answering models count tokens, one counter per kind of tokenizer (for the answer budget)."""
    counters: list[Callable[[list[str]], list[int]]] = []
    adapter = trained.adapter_path or (champion.adapter_path if champion is not None else None)
    if adapter is not None:
        tokenizer = load_tokenizer(adapter)
        counters.append(lambda texts: [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]])
    if trained.is_api_model or (champion is not None and champion.fine_tuned_model):
        counters.append(lambda texts: [len(t.encode()) for t in texts])  # an API tokenizer: at most a token a byte
    return counters


def heldout_answers(trained: TrainedModel, champion: Champion | None, heldout: list[HeldOutExample],
                    evaluate: EvaluateConfig, openai: OpenAITrainConfig | None, cache: GenerationCache,
                    warn: Callable[[str], None] | None = None,
                    baseline: PromptedBaseline | None = None) -> dict[str, list[str]]:
    """Base, candidate and (when there is one) champion answers, each where that model runs: an API model
    through the API (on Azure with managed deployments, through its deployment: see lib/azure_deploy.py), a
    local adapter on its base model. How the candidate and its base answer is its kind's (``candidate_answers``)."""
    api = ApiAnswers(openai, heldout, evaluate, cache, warn)
    texts = candidate_answers(trained, champion, heldout, evaluate, api, baseline)
    if champion is not None and champion.fine_tuned_model:  # an API champion answers through the API
        if openai is None:
            raise TuneloopError(f"evaluate: champion v{champion.version} is {champion.fine_tuned_model}: "
                                "set train.openai to reach it")
        texts["champion"] = api(champion.fine_tuned_model, "champion")
    return texts


class ApiAnswers:
    """Answers of a model behind the API, cached; a deployment is made only when answers are missing."""

    def __init__(self, openai: OpenAITrainConfig | None, heldout: list[HeldOutExample], evaluate: EvaluateConfig,
                 cache: GenerationCache, warn: Callable[[str], None] | None):
        self.openai, self.heldout, self.evaluate, self.cache, self.warn = openai, heldout, evaluate, cache, warn

    def __call__(self, model: str, role: str | None = None, job_id: str | None = None) -> list[str]:
        def produce(exs: list[HeldOutExample]) -> list[str]:
            target = answering_deployment(self.openai, role, model, job_id, self.warn) if role else model
            return chat_answers(self.openai, target, exs, self.evaluate.max_new_tokens, self.warn)
        return self.cache.answers(f"openai:{model}", self.heldout, produce)


@singledispatch
def candidate_answers(trained, champion: Champion | None, heldout: list[HeldOutExample], evaluate: EvaluateConfig,
                      api: ApiAnswers, baseline: PromptedBaseline | None = None) -> dict[str, list[str]]:
    """The base's and the candidate's answers (and a local champion's, and the prompted baseline's, beside
    them), as the candidate's kind answers: one implementation per kind of ``TrainedModel``."""
    raise TypeError(f"no answerer for {type(trained).__name__}")


@candidate_answers.register
def _(trained: LocalAdapter, champion: Champion | None, heldout: list[HeldOutExample], evaluate: EvaluateConfig,
      api: ApiAnswers, baseline: PromptedBaseline | None = None) -> dict[str, list[str]]:
    quiet_libraries()
    return local_answers(trained.base_model, trained.adapter_path, champion, heldout, evaluate, api.cache, baseline)


@candidate_answers.register
def _(trained: ApiModel, champion: Champion | None, heldout: list[HeldOutExample], evaluate: EvaluateConfig,
      api: ApiAnswers, baseline: PromptedBaseline | None = None) -> dict[str, list[str]]:
    # no prompted baseline here: each held-out example asked again with shots is paid for, per run
    azure = deployments_of(api.openai)
    if azure is not None:  # what earlier runs left goes before this candidate is deployed
        clear_earlier_candidates(azure, keep=candidate_deployment(trained.fine_tuned_model, trained.job_id))
    texts = {"base": api(answering_deployment(api.openai, "base", trained.base_model)),
             "candidate": api(trained.fine_tuned_model, "candidate", trained.job_id)}
    if champion is not None and champion.adapter_path is not None and champion.fine_tuned_model is None:
        # a local champion, scored on its own base (no candidate adapter to share it with)
        texts["champion"] = local_answers(champion.base_model, champion.adapter_path, None, heldout, evaluate,
                                          api.cache)["candidate"]
    return texts


def judge_grade(judge: JudgeConfig, examples: list[HeldOutExample], answers: list[str],
                warn: Callable[[str], None] | None = None) -> float:
    """Mean grade (1..5 scaled to 0..1) an LLM judge gives the answers against the references; a reply
    without a grade counts as the lowest."""
    cfg = ApiClientConfig(provider="compatible" if judge.base_url else "openai", base_url=judge.base_url,
                          api_key_env=judge.api_key_env, eval_concurrency=judge.concurrency)
    prompts = []
    for e, a in zip(examples, answers, strict=True):
        question = next((m["content"] for m in reversed(e.prompt) if m["role"] == "user"), "")
        prompts.append([{"role": "system", "content": judge.rubric},
                        {"role": "user", "content": f"Question:\n{question}\n\nReference answer:\n{e.expected}"
                                                    f"\n\nAnswer to grade:\n{a}"}])
    grades = []
    for reply in chat_completions(cfg, judge.model, prompts, max_tokens=4, warn=warn):
        m = re.search(r"[1-5]", reply)
        grades.append((int(m.group(0)) - 1) / 4 if m else 0.0)
    return round(sum(grades) / len(grades), 4)
