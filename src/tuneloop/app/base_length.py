"""``tuneloop init --base-model``: ``max_length`` measured with the pretrained model's own tokenizer and chat
template on the sample, instead of estimated from characters (off by a third or more between tokenizers)."""

from __future__ import annotations

from dataclasses import dataclass

import orjson

from tuneloop.app.profile import as_text
from tuneloop.app.proposal import Proposal, Templates
from tuneloop.core.records import TuneloopError


@dataclass
class MeasuredLength:
    """max_length measured with the base model's own tokenizer and chat template, not estimated."""
    max_length: int
    p99: int  # tokens of the 99th-percentile example
    longest: int
    n: int  # examples measured


MEASURE_ROWS = 2000  # sample records rendered and tokenized to size max_length for a real base model


def trainable_tokenizer(base_model: str):
    """The tokenizer of ``--base-model``, loaded offline-safe; a template that cannot be trained is refused here,
    as preflight would refuse it later."""
    from tuneloop.core.chat_templates import training_chat_template
    from tuneloop.lib.base_model import base_tokenizer

    tokenizer = base_tokenizer(base_model)
    training_chat_template(tokenizer, base_model, None)
    return tokenizer


def _example_messages(row: dict, proposal: Proposal, templates: Templates) -> list[dict] | None:
    """The chat example a sample record becomes (None: a field the mapping reads is missing)."""
    if proposal.messages:
        value = row.get(proposal.messages)
        if isinstance(value, str):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError:
                return None
        ok = isinstance(value, list) and value and all(
            isinstance(m, dict) and isinstance(m.get("content"), str) for m in value)
        return [{"role": m.get("role", "user"), "content": m["content"]} for m in value] if ok else None
    names = [n for n in [*proposal.text, proposal.answer, proposal.label] if n]
    fields = {n: as_text(row.get(n)) for n in names}
    if any(not v for v in fields.values()):
        return None
    messages = [{"role": "system", "content": templates.system}] if templates.system else []
    return messages + [{"role": "user", "content": (templates.user or "").format(**fields)},
                       {"role": "assistant", "content": (templates.assistant or "").format(**fields)}]


def measured_max_length(rows: list[dict], proposal: Proposal, templates: Templates, tokenizer) -> MeasuredLength:
    """Tokens per training example: the sample's longest-but-one-percent example as the base model's chat
    template renders it, counted by its tokenizer, rounded up to 64 (at least 128, at most 2048). The
    characters-per-token estimate is off by a third or more between tokenizers; this is not."""
    texts = []
    for row in rows[:MEASURE_ROWS]:
        messages = _example_messages(row, proposal, templates)
        if not messages:
            continue
        try:
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        except Exception as exc:  # jinja2's TemplateError, or a template's own raise_exception
            roles = "/".join(m["role"] for m in messages)
            raise TuneloopError(f"--base-model: its chat template cannot render an example of this sample ({roles}: "
                                f"{exc}); a template without a system role needs mapping.system unset, or set "
                                "train.local.chat_template") from None
    if not texts:
        raise TuneloopError("no sample record has every field the mapping reads: nothing to measure max_length on")
    counts = sorted(len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"])
    p99 = counts[min(len(counts) - 1, int(0.99 * len(counts)))]
    limit = 2048
    if isinstance(tokenizer.model_max_length, int) and 128 <= tokenizer.model_max_length < limit:
        limit = tokenizer.model_max_length
    return MeasuredLength(int(min(limit, max(128, 64 * -(-p99 // 64)))), p99, counts[-1], len(counts))
