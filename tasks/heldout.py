"""The held-out evaluation examples: read once, mapped like training data, never trained on."""

from __future__ import annotations

from pathlib import Path

import orjson
from pydantic import BaseModel

from tuneloop.core.config import MappingConfig
from tuneloop.core.records import TuneloopError
from tuneloop.tasks.quality import normalize_texts


class HeldOutExample(BaseModel):
    record_id: str
    prompt: list[dict[str, str]]
    expected: str
    label: str | None


def prompt_keys(prompts: list[list[dict[str, str]]]) -> list[str]:
    """What makes two examples 'the same question': their normalized user messages."""
    users = [[str(m.get("content") or "") for m in p if m.get("role") == "user"] for p in prompts]
    flat = iter(normalize_texts([c for u in users for c in u]))
    return ["\n".join(next(flat) for _ in u) for u in users]


GOLDEN_PREFIX = "golden:"


def read_evaluation_set(evaluate, mapping: MappingConfig) -> list[HeldOutExample]:
    """The held-out file (capped at evaluate.max_examples) plus the whole golden set, ids prefixed."""
    examples = read_heldout(evaluate.holdout, mapping, evaluate.max_examples)
    if evaluate.golden is not None:
        golden = read_heldout(evaluate.golden, mapping, field_name="evaluate.golden")
        examples += [g.model_copy(update={"record_id": GOLDEN_PREFIX + g.record_id}) for g in golden]
    return examples


def read_heldout(path: Path, mapping: MappingConfig, limit: int | None = None,
                 field_name: str = "evaluate.holdout") -> list[HeldOutExample]:
    if not path.is_file():
        raise TuneloopError(f"{field_name}: {path} does not exist")
    examples: list[HeldOutExample] = []
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
            try:
                prompt = []
                if mapping.system:
                    prompt.append({"role": "system", "content": mapping.system.format(**row)})
                prompt.append({"role": "user", "content": mapping.user.format(**row)})
                expected = mapping.assistant.format(**row)
            except KeyError as exc:
                raise TuneloopError(f"{path}:{lineno}: field {exc.args[0]!r} is missing") from None
            label = row.get(mapping.label) if mapping.label else None
            examples.append(HeldOutExample(
                record_id=str(row.get(mapping.id, f"{path.name}:{lineno}")),
                prompt=prompt, expected=expected, label=None if label is None else str(label),
            ))
            if limit and len(examples) >= limit:
                break
    if not examples:
        raise TuneloopError(f"{field_name}: {path} holds no examples")
    return examples

