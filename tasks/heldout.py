"""The held-out evaluation examples: read once, mapped like training data, never trained on."""

from __future__ import annotations

from pathlib import Path

import orjson
from pydantic import BaseModel

from flows.config import MappingConfig
from tasks.quality import _normalize
from tasks.records import TuneloopError


class HeldOutExample(BaseModel):
    record_id: str
    prompt: list[dict[str, str]]
    expected: str
    label: str | None


def prompt_key(prompt: list[dict[str, str]]) -> str:
    """What makes two examples 'the same question': the normalized user messages."""
    return "\n".join(_normalize(m["content"]) for m in prompt if m["role"] == "user")


def read_heldout(path: Path, mapping: MappingConfig, limit: int | None = None) -> list[HeldOutExample]:
    if not path.is_file():
        raise TuneloopError(f"evaluate.holdout: {path} does not exist")
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
        raise TuneloopError(f"evaluate.holdout: {path} holds no examples")
    return examples

