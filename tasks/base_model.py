"""Base models: a tiny one built offline from a corpus, or a real one from a local path / the hub.

The demo and the tests cannot download weights, so ``base_model: tiny`` builds a small Llama-shaped
model with a byte-level BPE tokenizer trained on the demo text. It is cached under the state folder,
keyed by its settings and corpus hash, so every run (and every champion) shares the same base.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from tuneloop.core.records import TuneloopError

if TYPE_CHECKING:
    from tuneloop.core.config import TinyBaseConfig, TrainConfig

TINY = "tiny"
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

# ChatML with generation markers, so TRL's assistant_only_loss can mask everything but the answers.
# Also the documented fallback for base models that ship without a chat template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


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


def adapter_identity(base_model: str, adapter_path: Path) -> str:
    """The same adapter weights on the same base answer the same: hash the weights, not the path."""
    digest = hashlib.sha256(str(base_model).encode())
    for f in sorted(adapter_path.glob("adapter_*")):
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    return f"local:{digest.hexdigest()[:24]}"


def resolve_base_model(train: TrainConfig, models_dir: Path) -> Path | str:
    """Where to load the base model from: the cached tiny model (built on first use) or the configured id."""
    if train.base_model != TINY:
        return train.base_model
    out = models_dir / f"tiny-{tiny_model_key(train.tiny)}"
    if not out.is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_model(train.tiny, out)
    return out


def quiet_libraries() -> None:
    """Progress bars and deprecation chatter drown the run log; our stages log their own progress."""
    import warnings

    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in v6.*")


def load_tokenizer(source: Path | str):
    """The base model's tokenizer, with a chat template and a pad token guaranteed."""
    from transformers import AutoTokenizer

    tokenizer = _load(AutoTokenizer.from_pretrained, source)
    if tokenizer.chat_template is None:
        tokenizer.chat_template = CHATML_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(source: Path | str, **kwargs):
    from transformers import AutoModelForCausalLM

    return _load(lambda s: AutoModelForCausalLM.from_pretrained(s, **kwargs), source)


def _load(loader, source: Path | str):
    """Load from a local folder or the hub; offline, a missing model is one readable error."""
    try:
        return loader(str(source))
    except OSError as exc:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in {"1", "true", "yes"}
        where = "it is not a local folder and" if not Path(str(source)).exists() else "the folder is incomplete or"
        hint = (
            "HF_HUB_OFFLINE is set, so nothing is downloaded"
            if offline
            else "the hub could not be reached or does not have it"
        )
        raise TuneloopError(
            f"cannot load base model {source!s}: {where} {hint}. Download it on a connected machine "
            f"(`hf download {source}` or `save_pretrained`) and set train.base_model to that folder."
        ) from exc
