"""Base models: a tiny one built offline from a corpus, or a real one from a local path / the hub.

The demo and the tests cannot download weights, so ``base_model: tiny`` builds a small Llama-shaped
model with a byte-level BPE tokenizer trained on the demo text. It is cached under the state folder,
keyed by its settings and corpus hash, so every run (and every champion) shares the same base.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING

from tuneloop.core.models import CHATML_TEMPLATE
from tuneloop.core.records import TuneloopError

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


def resolve_base_model(train: TrainConfig, models_dir: Path) -> Path | str:
    """Where to load the base model from: the cached tiny model (built on first use) or the configured id."""
    if train.base_model != TINY:
        return train.base_model
    out = models_dir / f"tiny-{tiny_model_key(train.tiny)}"
    if not out.is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_model(train.tiny, out)
    return out


