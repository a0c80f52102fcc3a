"""Token counts and the cost estimate: what a training job will bill, known before anything is uploaded.

OpenAI models are counted with tiktoken the way OpenAI's chat recipe counts (3 tokens per message, the
encoded length of each value, +1 for a name, +3 per example); a ``weight`` is not text and is not
counted, and non-text values (``tool_calls``, ``tools``) count as their JSON. The local backend counts
with its base model's own tokenizer and chat template, which is what the trainer sees.

tiktoken downloads its encoding files at first use; offline that fails, so the cache folder is
configurable and a missing file is a message saying how to provide it, never a silent guess.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

import orjson

from tuneloop.core.records import CostEstimate, TokenStats, TuneloopError

if TYPE_CHECKING:
    import tiktoken

    from tuneloop.core.config import OpenAITrainConfig

TOKENS_PER_MESSAGE = 3
TOKENS_PER_NAME = 1
TOKENS_PER_EXAMPLE = 3  # every reply is primed with <|start|>assistant<|message|>
NOT_COUNTED = frozenset({"weight"})
ENCODINGS_URL = "https://openaipublic.blob.core.windows.net/encodings"

# OpenAI's default epochs (fine-tuning guide / chat recipe): 3, kept so that examples x epochs stays in range.
TARGET_EPOCHS, MIN_TARGET_EXAMPLES, MAX_TARGET_EXAMPLES, MIN_EPOCHS, MAX_EPOCHS = 3, 100, 25_000, 1, 25


class TokenCounter(Protocol):
    name: str

    def count(self, examples: Sequence[list[dict]]) -> list[int]: ...


class TiktokenCounter:
    """Recipe-exact counts, fast: each distinct string is encoded once, in threads (tiktoken releases the GIL)."""

    def __init__(self, encoding: tiktoken.Encoding, threads: int | None = None):
        self.encoding = encoding
        self.name = f"tiktoken:{encoding.name}"
        self.threads = threads or min(4, os.cpu_count() or 1)

    def lengths(self, texts: list[str]) -> list[int]:
        encode = self.encoding.encode_ordinary
        if self.threads <= 1 or len(texts) < 2048:
            return [len(encode(t)) for t in texts]
        step = -(-len(texts) // self.threads)
        parts = [texts[i:i + step] for i in range(0, len(texts), step)]
        with ThreadPoolExecutor(self.threads) as pool:
            done = pool.map(lambda part: [len(encode(t)) for t in part], parts)
            return [n for part in done for n in part]

    def count(self, examples: Sequence[list[dict]]) -> list[int]:
        index: dict[str, int] = {}
        setdefault = index.setdefault
        fixed: list[int] = []
        refs: list[list[int]] = []
        for messages in examples:
            constant = TOKENS_PER_EXAMPLE + TOKENS_PER_MESSAGE * len(messages)
            ids: list[int] = []
            for message in messages:
                for key, value in message.items():
                    if value.__class__ is not str:
                        if key in NOT_COUNTED or value is None:
                            continue
                        value = orjson.dumps(value).decode()
                    ids.append(setdefault(value, len(index)))
                    if key == "name":
                        constant += TOKENS_PER_NAME
            fixed.append(constant)
            refs.append(ids)
        lengths = self.lengths(list(index))
        return [c + sum([lengths[i] for i in ids]) for c, ids in zip(fixed, refs, strict=True)]


class ChatTemplateCounter:
    """The local backend's view: the whole example rendered by the chat template the trainer formats with.

    That is ``train.local.chat_template`` when set, else the base model's own template: the training variant
    TRL swaps in for a known family (``core.chat_templates``) only adds ``{% generation %}`` markers, which
    render nothing, so it counts the same (tests/test_model_families.py checks this against the trainer's
    tokenized examples for each family).
    """

    def __init__(self, tokenizer, name: str, chat_template: str | None = None):
        self.tokenizer = tokenizer
        self.template = None
        self.name = f"chat-template:{name}"
        if chat_template is not None:
            from tuneloop.core.chat_templates import template_from_option

            self.template = template_from_option(chat_template)
            self.name += f"+{hashlib.sha256(self.template.encode()).hexdigest()[:8]}"

    def count(self, examples: Sequence[list[dict]]) -> list[int]:
        texts = [self.tokenizer.apply_chat_template(list(m), tokenize=False, chat_template=self.template)
                 for m in examples]
        if not texts:
            return []
        ids = self.tokenizer(texts, add_special_tokens=False)["input_ids"]
        return [len(i) for i in ids]


def _encoding_from_file(name: str, path: Path) -> tiktoken.Encoding:
    """An encoding named ``name`` whose ranks come from a local .tiktoken file (split pattern and specials
    are the named encoding's), for machines that cannot download."""
    from unittest import mock

    import tiktoken
    from tiktoken.load import load_tiktoken_bpe
    from tiktoken_ext import openai_public

    if name not in openai_public.ENCODING_CONSTRUCTORS:
        raise TuneloopError(f"train.openai.tiktoken_file: no known encoding {name!r} to take the split pattern from")
    try:
        ranks = load_tiktoken_bpe(str(path))
    except Exception as exc:  # a wrong or damaged file: say which
        raise TuneloopError(f"train.openai.tiktoken_file: {path} is not a .tiktoken BPE file ({exc})") from None
    # The constructor knows the pattern and the special tokens; only its file loading is replaced.
    with mock.patch.object(openai_public, "load_tiktoken_bpe", lambda *a, **k: ranks):
        spec = openai_public.ENCODING_CONSTRUCTORS[name]()
    spec.pop("explicit_n_vocab", None)
    specials = {tok: len(ranks) + i for i, tok in enumerate(spec["special_tokens"])} \
        if max(spec["special_tokens"].values(), default=0) < len(ranks) else spec["special_tokens"]
    return tiktoken.Encoding(name=name, pat_str=spec["pat_str"], mergeable_ranks=ranks, special_tokens=specials)


def encoding_for_model(model: str, openai: OpenAITrainConfig, home: Path) -> tiktoken.Encoding:
    import tiktoken

    base = openai.base_of(model)
    try:
        name = tiktoken.encoding_name_for_model(base)
    except KeyError:
        raise TuneloopError(f"tiktoken does not know which encoding {model!r} uses; "
                            "count with a known model name (--model) or set train.openai.model") from None
    if openai.tiktoken_file is not None:
        if not openai.tiktoken_file.is_file():
            raise TuneloopError(f"train.openai.tiktoken_file: {openai.tiktoken_file} does not exist")
        return _encoding_from_file(name, openai.tiktoken_file)
    cache = openai.tiktoken_cache_dir or Path(os.environ.get("TIKTOKEN_CACHE_DIR") or home / "tiktoken")
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    try:
        return tiktoken.get_encoding(name)
    except (OSError, ValueError) as exc:  # requests' ConnectionError is an OSError
        url = f"{ENCODINGS_URL}/{name}.tiktoken"  # where tiktoken_ext.openai_public fetches it from
        where = f"download {url} on a machine with network and save it as {cache / hashlib.sha1(url.encode()).hexdigest()}"
        raise TuneloopError(
            f"tiktoken encoding {name!r} (for {model}) is not in {cache} and could not be downloaded "
            f"({type(exc).__name__}). To provide it: {where}; or set train.openai.tiktoken_file to the .tiktoken file"
        ) from None


def token_stats(counts: list[int], limit: int | None, counted_with: str) -> TokenStats:
    import numpy as np

    if not counts:
        return TokenStats(n_examples=0, total=0, min=0, p50=0, p95=0, max=0, limit=limit, counted_with=counted_with)
    arr = np.asarray(counts)
    return TokenStats(
        n_examples=len(counts), total=int(arr.sum()), min=int(arr.min()), max=int(arr.max()),
        p50=int(np.percentile(arr, 50, method="nearest")), p95=int(np.percentile(arr, 95, method="nearest")),
        limit=limit, n_over_limit=int((arr > limit).sum()) if limit else 0, counted_with=counted_with,
    )


def resolve_epochs(n_examples: int, n_epochs: int | str) -> int:
    """A number is used as given; ``auto`` is OpenAI's default rule."""
    if n_epochs != "auto":
        return int(n_epochs)
    if n_examples <= 0:
        return TARGET_EPOCHS
    if n_examples * TARGET_EPOCHS < MIN_TARGET_EXAMPLES:
        return min(MAX_EPOCHS, MIN_TARGET_EXAMPLES // n_examples)
    if n_examples * TARGET_EPOCHS > MAX_TARGET_EXAMPLES:
        return max(MIN_EPOCHS, MAX_TARGET_EXAMPLES // n_examples)
    return TARGET_EPOCHS


def estimate_cost(counts: list[int], model: str, openai: OpenAITrainConfig, n_epochs: int | str | None = None) -> CostEstimate:
    spec = openai.spec(model)
    setting = openai.n_epochs if n_epochs is None else n_epochs
    epochs = resolve_epochs(len(counts), setting)
    per_epoch = sum(min(spec.context_tokens, n) for n in counts)
    billed = per_epoch * epochs
    return CostEstimate(
        model=model, n_examples=len(counts), epochs=epochs, epochs_setting=setting, tokens_per_epoch=per_epoch,
        billed_tokens=billed, usd_per_1m_training_tokens=spec.usd_per_1m_training_tokens,
        estimated_cost_usd=round(billed / 1e6 * spec.usd_per_1m_training_tokens, 4),
        n_over_limit=sum(n > spec.context_tokens for n in counts), context_tokens=spec.context_tokens,
    )


def enforce_budget(estimate: CostEstimate | None, max_cost_usd: float | None) -> None:
    """Stop before any upload when the job would cost more than the configured budget."""
    if estimate is None or max_cost_usd is None or estimate.estimated_cost_usd <= max_cost_usd:
        return
    raise TuneloopError(
        f"estimated training cost ${estimate.estimated_cost_usd:,.2f} exceeds train.max_cost_usd ${max_cost_usd:,.2f}"
        f" ({estimate.billed_tokens:,} billed tokens = {estimate.tokens_per_epoch:,} per epoch x {estimate.epochs}"
        f" epochs at ${estimate.usd_per_1m_training_tokens}/1M for {estimate.model}); nothing was uploaded")
