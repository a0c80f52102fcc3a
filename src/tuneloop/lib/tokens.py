"""Token counts and the cost estimate: what a training job will bill, known before anything is uploaded.

OpenAI models are counted the way OpenAI's chat recipe counts with tiktoken (3 tokens per message, the
encoded length of each value, +1 for a name, +3 per example); a ``weight`` is not text and is not
counted, and non-text values (``tool_calls``, ``tools``) count as their JSON. The local backend counts
with its base model's own tokenizer and chat template, which is what the trainer sees.

The encoder: quicktok (an exact BPE, 4-9x tiktoken's speed here) when it ships the encoding and agrees
with tiktoken on a probe of awkward text, else tiktoken itself; tiktoken stays the reference.

Encodings offline: tiktoken downloads OpenAI's ``.tiktoken`` files at first use. quicktok embeds the same
ranks, so the file is rebuilt from them into tiktoken's cache, and kept only when its SHA-256 is the
one tiktoken knows for the published file: o200k_base and cl100k_base work with no network. For any
other encoding a missing file is a message saying how to provide it, never a silent guess.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import logging
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from tuneloop.core.records import CostEstimate, TokenStats, TuneloopError
from tuneloop.core.state import sha256_file, write_atomically

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
    """Counts in two halves: ``prepare`` (Python, holds the GIL) and ``finish`` (the encoder, which releases
    it), so a caller can run ``finish`` on another thread while it parses more; ``count`` is both."""

    name: str

    def prepare(self, examples: Sequence[list[dict]]) -> Any: ...

    def finish(self, prepared: Any) -> list[int]: ...

    def count(self, examples: Sequence[list[dict]]) -> list[int]: ...


# Text an encoder is most likely to get wrong: the fast encoder must count all of it as tiktoken does.
PROBES = (
    "Hello, world!", "", " ", "  \n\n\t  \r\n", " " * 97 + "x", "\n" * 40, "1234567890" * 13, "3.14159e-10 0x1F 1,024",
    "def f(x):\n    return {'k': [x ** 2 for x in range(10)]}  # ok\n", "if (a && b) { c->d(); }\t//",
    "<|endoftext|> <|endofprompt|> <|im_start|>user<|im_end|> <|fim_prefix|>", "<|endoftext",
    "日本語のテキスト、句読点。", "中文标点：“引号”！", "한국어 문장입니다.", "Привет, мир! Ёжик", "مرحبا بالعالم ١٢٣",
    "שלום עולם", "नमस्ते दुनिया", "ภาษาไทยไม่มีช่องว่าง", "Ελληνικά ΑΒΓ", "e\u0301 n\u0303 Å Å", "ﬁ ﬀ ﷺ",
    "👩‍👩‍👧‍👦 🏳️‍🌈 👍🏽 🇫🇷🇩🇪", "\u200b\u200d\ufeff zero-width", "don't WON'T it's I'M you'd", "ALLCAPS camelCase snake_case",
    "https://example.com/a?b=c&d=%20e#f", "<div class=\"x\">&amp;</div>", "$$\\frac{a}{b}$$", "\x00\x01\x7f",
)


class TiktokenCounter:
    """Recipe-exact counts, fast: each distinct string is encoded once, in threads (tiktoken releases the GIL)."""

    engine = "tiktoken"

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
        return self.finish(self.prepare(examples))

    def prepare(self, examples: Sequence[list[dict]]) -> tuple[list[str], list[int], list[list[int]]]:
        """The distinct texts, and per example its fixed tokens and which texts it holds."""
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
        return list(index), fixed, refs

    def finish(self, prepared: tuple[list[str], list[int], list[list[int]]]) -> list[int]:
        texts, fixed, refs = prepared
        lengths = self.lengths(texts)
        return [c + sum([lengths[i] for i in ids]) for c, ids in zip(fixed, refs, strict=True)]


class QuicktokCounter(TiktokenCounter):
    """The same counts as TiktokenCounter (same name, so the same export cache key) from quicktok's encoder.

    Encoding is cheap enough here that looking strings up costs more than counting them again: only roles
    are remembered; every other value goes, in one list, to quicktok's native threads.
    """

    engine = "quicktok"

    def __init__(self, encoding: tiktoken.Encoding, fast, threads: int | None = None):
        super().__init__(encoding, threads)
        self.fast = fast
        self.short: dict[str, int] = {}

    def lengths(self, texts: list[str]) -> list[int]:
        return self._lengths(texts).tolist()

    def _lengths(self, texts: list[str]):
        import numpy as np
        import quicktok

        if not texts:
            return np.zeros(0, dtype=np.int64)
        try:
            return quicktok.count_batch(self.fast, texts, threads=1 if len(texts) < 2048 else self.threads)
        except (TypeError, ValueError, UnicodeError):  # text quicktok refuses (a lone surrogate): tiktoken counts it
            return np.asarray(TiktokenCounter.lengths(self, texts), dtype=np.int64)

    def _role(self, role: str) -> int:
        """A role's length, remembered: a handful of roles repeat on every message (bounded, whatever comes)."""
        n = self.short.get(role)
        if n is None:
            n = int(self._lengths([role])[0])
            if len(self.short) < 64:
                self.short[role] = n
        return n

    def prepare(self, examples: Sequence[list[dict]]) -> tuple[list[str], list[int], list[int]]:
        """The Python half (needs the GIL): the recipe's fixed tokens per example and the texts to encode."""
        short = self.short
        texts: list[str] = []
        append = texts.append
        fixed: list[int] = []
        ends: list[int] = []
        for messages in examples:
            constant = TOKENS_PER_EXAMPLE + TOKENS_PER_MESSAGE * len(messages)
            for message in messages:
                if len(message) == 2:  # the usual {"role", "content"}: fewer steps than the general loop
                    role, content = message.get("role"), message.get("content")
                    if role.__class__ is str and content.__class__ is str:
                        constant += short[role] if role in short else self._role(role)
                        append(content)
                        continue
                for key, value in message.items():
                    if value.__class__ is not str:
                        if key in NOT_COUNTED or value is None:
                            continue
                        value = orjson.dumps(value).decode()
                    if key == "role":
                        constant += self._role(value)
                    else:
                        append(value)
                        if key == "name":
                            constant += TOKENS_PER_NAME
            fixed.append(constant)
            ends.append(len(texts))
        return texts, fixed, ends

    def finish(self, prepared: tuple[list[str], list[int], list[int]]) -> list[int]:
        """The native half (encodes outside the GIL): a thread can run it while Python does other work."""
        import numpy as np

        texts, fixed, ends = prepared
        if not fixed:
            return []
        running = np.concatenate(([0], np.cumsum(self._lengths(texts))))
        bounds = np.asarray(ends)
        return (running[bounds] - running[np.concatenate(([0], bounds[:-1]))] + np.asarray(fixed)).tolist()


def _construct(name: str, load_ranks) -> dict:
    """tiktoken_ext's constructor for ``name`` run with ``load_ranks`` in place of its file loading, on a copy
    of the function (patching the module would race another thread loading an encoding)."""
    import types

    from tiktoken_ext import openai_public

    build = openai_public.ENCODING_CONSTRUCTORS[name]
    copy = types.FunctionType(build.__code__, {**build.__globals__, "load_tiktoken_bpe": load_ranks},
                              build.__name__, build.__defaults__, build.__closure__)
    return copy()


@functools.cache
def published_file(name: str) -> tuple[str, str | None]:
    """Where tiktoken downloads encoding ``name`` from, and the SHA-256 it expects of that file (None: not a
    file-backed encoding tiktoken_ext knows)."""
    from tiktoken_ext import openai_public

    seen: dict[str, str | None] = {"url": f"{ENCODINGS_URL}/{name}.tiktoken", "sha256": None}

    def capture(url, expected_hash=None, **_):
        seen.update(url=url, sha256=expected_hash)
        return {}

    if name in openai_public.ENCODING_CONSTRUCTORS:
        try:
            _construct(name, capture)
        except Exception:  # an encoding built another way (gpt2): no single published file
            seen["sha256"] = None
    return seen["url"], seen["sha256"]


def _quicktok(name: str):
    try:
        import quicktok
    except ImportError:  # not installed (no wheel for the platform): tiktoken counts
        return None
    try:
        return quicktok.get_encoding(name)
    except (RuntimeError, ValueError, KeyError, OSError):
        return None


def packaged_tiktoken_file(name: str) -> bytes | None:
    """OpenAI's ``.tiktoken`` file for ``name``, rebuilt from the ranks an installed package embeds; only
    when byte-identical to the published one (its SHA-256 is the one tiktoken checks downloads against)."""
    fast = _quicktok(name)
    _, sha256 = published_file(name)
    if fast is None or sha256 is None:
        return None
    lines = []
    for rank in range(fast.n_vocab):
        if fast.is_special_token(rank):
            continue
        try:
            token = fast.decode_single_token_bytes(rank)
        except Exception:  # a gap in the ranks (cl100k has one before its specials)
            continue
        lines.append(base64.b64encode(token) + b" " + str(rank).encode())
    blob = b"\n".join(lines) + b"\n"
    return blob if hashlib.sha256(blob).hexdigest() == sha256 else None


_AGREES: dict[str, bool] = {}


def _agrees(fast, reference: tiktoken.Encoding) -> bool:
    if reference.name not in _AGREES:
        try:
            _AGREES[reference.name] = all(fast.count(t) == len(reference.encode_ordinary(t)) for t in PROBES)
        except Exception:  # a fast encoder that fails on the probe is not used
            _AGREES[reference.name] = False
    return _AGREES[reference.name]


def fastest_counter(encoding: tiktoken.Encoding, published: bool, threads: int | None = None) -> TiktokenCounter:
    """quicktok for OpenAI's published ranks when it agrees with tiktoken on PROBES; tiktoken otherwise."""
    fast = _quicktok(encoding.name) if published else None
    if fast is not None and fast.n_vocab == encoding.n_vocab and _agrees(fast, encoding):
        return QuicktokCounter(encoding, fast, threads)
    if fast is not None:
        logging.getLogger(__name__).warning(
            "quicktok disagrees with tiktoken on %s: counting with tiktoken", encoding.name)
    return TiktokenCounter(encoding, threads)


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
        return self.finish(self.prepare(examples))

    def prepare(self, examples: Sequence[list[dict]]) -> list[str]:
        """The examples rendered by the template (jinja, in Python)."""
        return [self.tokenizer.apply_chat_template(list(m), tokenize=False, chat_template=self.template)
                for m in examples]

    def finish(self, texts: list[str]) -> list[int]:
        """Tokenized in one batch (the fast tokenizer's Rust code releases the GIL)."""
        if not texts:
            return []
        return [len(i) for i in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]


def _encoding_from_file(name: str, path: Path) -> tiktoken.Encoding:
    """An encoding named ``name`` whose ranks come from a local .tiktoken file (split pattern and specials
    are the named encoding's), for machines that cannot download."""
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
    spec = _construct(name, lambda *a, **k: ranks)
    spec.pop("explicit_n_vocab", None)
    specials = {tok: len(ranks) + i for i, tok in enumerate(spec["special_tokens"])} \
        if max(spec["special_tokens"].values(), default=0) < len(ranks) else spec["special_tokens"]
    return tiktoken.Encoding(name=name, pat_str=spec["pat_str"], mergeable_ranks=ranks, special_tokens=specials)


def encoding_for_model(model: str, openai: OpenAITrainConfig, home: Path) -> tiktoken.Encoding:
    return _load_encoding(model, openai, home)[0]


def openai_counter(model: str, openai: OpenAITrainConfig, home: Path) -> TiktokenCounter:
    """How tuneloop counts for an OpenAI model: its encoding (offline where a package ships it), fastest
    exact encoder."""
    return fastest_counter(*_load_encoding(model, openai, home))


def _load_encoding(model: str, openai: OpenAITrainConfig, home: Path) -> tuple[tiktoken.Encoding, bool]:
    """The encoding, and whether its ranks are OpenAI's published file (checked by SHA-256)."""
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
        _, sha256 = published_file(name)
        published = sha256 is not None and sha256 == sha256_file(openai.tiktoken_file)
        return _encoding_from_file(name, openai.tiktoken_file), published
    cache = openai.tiktoken_cache_dir or Path(os.environ.get("TIKTOKEN_CACHE_DIR") or home / "tiktoken")
    cache.mkdir(parents=True, exist_ok=True)
    os.environ["TIKTOKEN_CACHE_DIR"] = str(cache)
    url, sha256 = published_file(name)
    cached = cache / hashlib.sha1(url.encode()).hexdigest()  # the file name tiktoken looks for
    if not cached.exists() and (blob := packaged_tiktoken_file(name)) is not None:
        write_atomically(cached, blob)
    try:
        return tiktoken.get_encoding(name), sha256 is not None
    except (OSError, ValueError) as exc:  # requests' ConnectionError is an OSError
        where = f"download {url} on a machine with network and save it as {cached}"
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
