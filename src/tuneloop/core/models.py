"""Loading a base model and its tokenizer, offline-safe: what training, evaluation and the serving model share.

A base model is a local folder or a hub id; offline, one that is not there is one readable error, never a
download attempt buried in a traceback.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tuneloop.core.records import TuneloopError

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


def adapter_identity(base_model: str, adapter_path: Path) -> str:
    """The same adapter weights on the same base answer the same: hash the weights, not the path."""
    digest = hashlib.sha256(str(base_model).encode())
    for f in sorted(adapter_path.glob("adapter_*")):
        digest.update(f.name.encode())
        digest.update(f.read_bytes())
    return f"local:{digest.hexdigest()[:24]}"


def quiet_libraries() -> None:
    """Progress bars and deprecation chatter drown the run log; our stages log their own progress."""
    import warnings

    import datasets
    from transformers.utils import logging as hf_logging

    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", message=r".*is deprecated and will be removed in v6.*")


def load_tokenizer(source: Path | str, **kwargs):
    """The base model's tokenizer, with a chat template and a pad token guaranteed."""
    from transformers import AutoTokenizer

    tokenizer = _load(lambda s: AutoTokenizer.from_pretrained(s, **kwargs), source)
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
