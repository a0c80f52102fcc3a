"""The held-out evaluation examples: read once, mapped like training data, never trained on.

They go through the same record->chat mapping as training records (core.mapping.RecordMapper: stripped
fields, PII redacted, ``mapping.messages`` honoured), so a held-out example has the same content hash as
its training twin and its overlap is found, and no personal data reaches an API model during evaluation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from pydantic import BaseModel

from tuneloop.core.config import EvaluateConfig, MappingConfig, QualityConfig
from tuneloop.core.mapping import RecordMapper, normalize_texts, required_fields
from tuneloop.core.records import ChatExample, RecordChunk, TuneloopError


class HeldOutExample(BaseModel):
    record_id: str
    prompt: list[dict[str, Any]]
    expected: str
    label: str | None
    content_hash: str = ""  # of the whole mapped example: equal to its training twin's


def prompt_keys(prompts: list[list[dict[str, str]]]) -> list[str]:
    """What makes two examples 'the same question': their normalized user messages."""
    users = [[str(m.get("content") or "") for m in p if m.get("role") == "user"] for p in prompts]
    flat = iter(normalize_texts([c for u in users for c in u]))
    return ["\n".join(next(flat) for _ in u) for u in users]


GOLDEN_PREFIX = "golden:"


def read_evaluation_set(evaluate: EvaluateConfig, mapping: MappingConfig,
                        quality: QualityConfig | None = None) -> list[HeldOutExample]:
    """The held-out file (capped at evaluate.max_examples) plus the whole golden set, ids prefixed."""
    examples = read_heldout(evaluate.holdout, mapping, evaluate.max_examples, quality=quality)
    if evaluate.golden is not None:
        golden = read_heldout(evaluate.golden, mapping, field_name="evaluate.golden", quality=quality)
        examples += [g.model_copy(update={"record_id": GOLDEN_PREFIX + g.record_id}) for g in golden]
    return examples


def heldout_example(example: ChatExample, where: str) -> HeldOutExample:
    """Split a mapped example into the prompt (everything before the last answer) and that answer."""
    messages = example.messages
    if not messages or messages[-1].get("role") != "assistant":
        raise TuneloopError(f"{where}: the mapped example does not end with an assistant message to score against")
    return HeldOutExample(record_id=example.record_id, prompt=messages[:-1],
                          expected=str(messages[-1].get("content") or ""), label=example.label,
                          content_hash=example.content_hash)


def read_heldout(path: Path, mapping: MappingConfig, limit: int | None = None,
                 field_name: str = "evaluate.holdout", quality: QualityConfig | None = None) -> list[HeldOutExample]:
    """A JSONL file of records in the source's own shape (the fields the mapping reads)."""
    if not path.is_file():
        raise TuneloopError(f"{field_name}: {path} does not exist")
    # Held-out prompts may go to an API model: redact whatever the gate's policy, never send PII out.
    mapper = RecordMapper(mapping, (quality or QualityConfig()).model_copy(update={"pii": "redact"}))
    # every field the templates read; the label only where a task scores labels (checked by evaluate)
    needed = [name for name in required_fields(mapping) if name != mapping.label]
    chunk = RecordChunk()
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                row = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                raise TuneloopError(f"{path}:{lineno}: not valid JSON ({exc})") from None
            if not isinstance(row, dict):
                raise TuneloopError(f"{path}:{lineno}: expected a JSON object")
            missing = [name for name in needed if row.get(name) is None]
            if missing:
                raise TuneloopError(f"{path}:{lineno}: field {missing[0]!r} is missing")
            chunk.add(row, str(path), lineno)
            if limit and len(chunk) >= limit:
                break
    if not chunk.rows:
        raise TuneloopError(f"{field_name}: {path} holds no examples")
    prepared = mapper.prepare(chunk)
    return [heldout_example(ChatExample.model_validate_json(line), f"{path}:{lineno}")
            for line, lineno in zip(prepared.examples, prepared.lines, strict=True)]


def read_fitted_heldout(path: Path) -> list[HeldOutExample]:
    """The held-out set as the export held it to the training limit (heldout.jsonl): what evaluation asks."""
    return [HeldOutExample.model_validate(orjson.loads(line)) for line in path.read_bytes().splitlines() if line.strip()]
