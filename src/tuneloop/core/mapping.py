"""Record -> chat example: the mapping's fields, PII handling, rendering and the content hash.

A record becomes an OpenAI chat example through templates over its fields (``mapping.system/user/
assistant``) or a column that already holds ``messages``. The content hash is of an example's meaning
(case and whitespace folded), so it identifies the same example wherever it was read: landing file, SQL
row or held-out file.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from tuneloop.core.config import MappingConfig, QualityConfig
from tuneloop.core.pii import pii_kinds, scan_pii
from tuneloop.core.records import QuarantineEntry, RecordChunk

ROLES = {"system", "user", "assistant", "tool", "developer"}


def fields_of(template: str | None) -> list[str]:
    """The ``{field}`` names one template reads, in order."""
    return [name for _, name, _, _ in string.Formatter().parse(template or "") if name]


def template_fields(mapping: MappingConfig) -> list[str]:
    """The record fields the mapping reads, in first-use order."""
    names: list[str] = []
    if mapping.messages is None:
        for template in (mapping.system, mapping.user, mapping.assistant):
            for name in fields_of(template):
                if name not in names:
                    names.append(name)
    return names


def required_fields(mapping: MappingConfig, teacher: bool = False) -> list[str]:
    """Columns a source must have for the mapping to make sense (checked before any work). With a teacher
    (distill.teacher), the answer's own fields may be absent: a file of questions only is the teacher's to answer."""
    names = template_fields(mapping)
    for extra in (mapping.messages, mapping.label):
        if extra and extra not in names:
            names.append(extra)
    if teacher:
        unasked = set(answer_fields(mapping))
        names = [n for n in names if n not in unasked]
    return names


def answer_fields(mapping: MappingConfig) -> list[str]:
    """The fields only the answer reads (the assistant template's and the label): what a record can lack and
    still be a question a teacher answers (distill.teacher)."""
    if mapping.messages is not None:
        return []
    asked = set(fields_of(mapping.system)) | set(fields_of(mapping.user))
    names = [f for f in fields_of(mapping.assistant) if f not in asked]
    if mapping.label and mapping.label not in asked and mapping.label not in names:
        names.append(mapping.label)
    return names


def all_fields(mapping: MappingConfig) -> list[str]:
    names = required_fields(mapping)
    for extra in (mapping.id, *mapping.metadata):
        if extra and extra not in names:
            names.append(extra)
    return names


def normalize_text(text: str) -> str:
    """Casefolded, whitespace-collapsed text: what makes two examples 'the same'."""
    return " ".join(text.split()).casefold()


def normalize_texts(texts: list[str]) -> list[str]:
    return [" ".join(t.split()).casefold() for t in texts]


def content_hash_of(pairs: Iterable[tuple[str, str]]) -> str:
    canon = "\x1f".join(f"{role}\x1e{normalize_text(content)}" for role, content in pairs)
    return hashlib.sha256(canon.encode("utf-8", "surrogatepass")).hexdigest()


def content_hash(messages: list[dict[str, Any]]) -> str:
    """Hash of an example's meaning, not its bytes: case and whitespace do not make a new example."""
    return content_hash_of((str(m.get("role")), str(m.get("content") or "")) for m in messages)


def render_column(template: str, columns: dict[str, list[Any]], rows: list[int]):
    """``template.format(**record)`` for many records at once (Arrow string joins when the template is
    plain ``{field}`` references; Python's format when it uses format specs or conversions)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    parts = list(string.Formatter().parse(template))
    if any(name is not None and (spec or conv or not name.isidentifier()) for _, name, spec, conv in parts):
        return pa.array([template.format(**{n: columns[n][i] for n in columns}) for i in rows], type=pa.large_string())
    pieces: list[Any] = []
    for literal, name, _, _ in parts:
        if literal:
            pieces.append(pa.scalar(literal, type=pa.large_string()))
        if name is not None:
            pieces.append(pa.array([columns[name][i] for i in rows], type=pa.large_string()))
    empty = pa.scalar("", type=pa.large_string())
    if not any(isinstance(p, pa.Array) for p in pieces):  # a template without fields: the same text for all
        pieces.append(pa.array([""] * len(rows), type=pa.large_string()))
    joined = pc.binary_join_element_wise(*pieces, empty, empty, null_handling="replace", null_replacement="None")
    return joined


def render_messages(mapping: MappingConfig, fields: dict[str, Any]) -> list[dict[str, Any]]:
    if mapping.messages is not None:
        value = fields.get(mapping.messages)
        if isinstance(value, str):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError:
                return []
        return value if isinstance(value, list) else []
    messages = []
    if mapping.system:
        messages.append({"role": "system", "content": mapping.system.format(**fields)})
    messages.append({"role": "user", "content": mapping.user.format(**fields)})
    messages.append({"role": "assistant", "content": mapping.assistant.format(**fields)})
    return messages


def flatten_chat(messages: list[Any]) -> dict[str, Any]:
    """The columns the chat suite checks: GX validates tables, not nested JSON."""
    ok = [m for m in messages if isinstance(m, dict)]
    roles = [str(m.get("role")) for m in ok]
    contents = [m.get("content") for m in ok]
    return {
        "n_messages": len(messages),
        "n_malformed": len(messages) - len(ok),
        "roles": ",".join(roles),
        "last_role": roles[-1] if roles else "",
        "n_unknown_roles": sum(r not in ROLES for r in roles),
        "n_empty_content": sum(not (isinstance(c, str) and c.strip()) for c, m in zip(contents, ok, strict=True)
                               if not m.get("tool_calls")),
        "n_chars": sum(len(c) for c in contents if isinstance(c, str)),
    }


@dataclass
class PreparedChunk:
    """A chunk after everything that does not depend on other chunks: picklable, so another process can
    make it. Row k of the chunk is row k of every list."""

    sources: list[str]
    lines: list[int]
    records: list[bytes]  # the original record as JSON, for the quarantine file
    keys: list[bytes]  # exact-duplicate key of the mapped content
    columns: dict[str, list[Any]]  # mapped fields, after PII handling: what the raw suite checks
    pii_reasons: dict[int, list[str]]
    n_redacted: int
    flat: Any  # DataFrame: the chat suite's columns, one row per record
    examples: list[bytes]  # the accepted example as a JSONL line, should it pass
    unreadable: list[QuarantineEntry]


def _normalized(role: str, texts: list[str], n_distinct: int) -> list[str]:
    """content_hash's per-message key for a column; a column of few distinct texts (a fixed system prompt)
    is normalized once per text."""
    if n_distinct * 2 > len(texts):
        return [f"{role}\x1e" + " ".join(t.split()).casefold() for t in texts]
    done = {t: f"{role}\x1e" + " ".join(t.split()).casefold() for t in set(texts)}
    return [done[t] for t in texts]


class RecordMapper:
    """Maps records to chat examples, handles PII, renders, hashes: everything per-row and order-free.

    The one record->chat mapping: the quality gate, the held-out reader and the drift monitor all use it."""

    def __init__(self, mapping: MappingConfig, quality: QualityConfig):
        self.mapping, self.redact = mapping, quality.pii == "redact"
        self.fields = all_fields(mapping)
        self.text_fields = template_fields(mapping)
        self.kinds = pii_kinds(quality)

    def prepare(self, chunk: RecordChunk) -> PreparedChunk:
        m = self.mapping
        columns: dict[str, list[Any]] = {}
        for name in self.fields:
            values = [r.get(name) for r in chunk.rows]
            if name != m.messages:  # a number where text is expected is read as its text
                values = [v.strip() if isinstance(v, str) else v if v is None else
                          orjson.dumps(v).decode() if isinstance(v, dict | list) else str(v) for v in values]
            columns[name] = values

        pii_reasons: dict[int, list[str]] = {}
        n_redacted = 0
        for name in self.text_fields:
            columns[name], found = scan_pii(columns[name], self.kinds, redact=self.redact)
            for i, counts in found.items():
                if self.redact:
                    n_redacted += sum(counts.values())
                else:
                    pii_reasons.setdefault(i, []).extend(f"pii:{k}({name})" for k in counts)
        if m.messages:
            for i, value in enumerate(columns[m.messages]):
                columns[m.messages][i], counts = self._scan_messages(value)
                if counts and self.redact:
                    n_redacted += sum(counts.values())
                elif counts:
                    pii_reasons.setdefault(i, []).extend(f"pii:{k}({m.messages})" for k in counts)

        n = len(chunk.rows)
        keys = [hashlib.sha256(orjson.dumps([columns[f][i] for f in self.fields], default=str)).digest()[:16]
                for i in range(n)]
        messages, flat, hashes = self._render(columns)
        labels = columns[m.label] if m.label else [None] * n
        ids = columns.get(m.id, [None] * n)
        examples = [orjson.dumps({
            "messages": messages[i],
            "label": None if labels[i] is None else str(labels[i]),
            "record_id": str(ids[i]) if ids[i] is not None else f"{Path(chunk.sources[i]).name}:{chunk.lines[i]}",
            "source": chunk.sources[i],
            "line": chunk.lines[i],
            "content_hash": hashes[i],
            "metadata": {name: columns[name][i] for name in m.metadata},
        }, default=str) + b"\n" for i in range(n)]
        return PreparedChunk(
            sources=chunk.sources, lines=chunk.lines,
            records=chunk.raw if len(chunk.raw) == n else [orjson.dumps(r, default=str) for r in chunk.rows],
            keys=keys, columns={k: v for k, v in columns.items() if k != m.messages}, pii_reasons=pii_reasons,
            n_redacted=n_redacted, flat=flat, examples=examples, unreadable=chunk.unreadable)

    def _render(self, columns: dict[str, list[Any]]):
        """Each row's chat messages, their content hashes, and the flattened columns the chat suite checks."""
        import pandas as pd
        import pyarrow.compute as pc

        m = self.mapping
        n = len(next(iter(columns.values()))) if columns else 0
        rows = list(range(n))
        if m.messages is not None:
            messages = [render_messages(m, {m.messages: value}) for value in columns[m.messages]]
            return messages, pd.DataFrame([flatten_chat(msgs) for msgs in messages], index=rows), \
                [content_hash(msgs) for msgs in messages]
        turns = [("system", m.system)] if m.system else []
        turns += [("user", m.user), ("assistant", m.assistant)]
        arrays = {role: render_column(template, columns, rows) for role, template in turns}
        names = [role for role, _ in turns]
        texts = [arrays[role].to_pylist() for role in names]
        messages = [[{"role": r, "content": t} for r, t in zip(names, row, strict=True)] for row in zip(*texts, strict=True)]
        # content_hash, unrolled over columns: the same value, without a call per message
        normalized = [_normalized(r, col, pc.count_distinct(arrays[r]).as_py()) for r, col in zip(names, texts, strict=True)]
        hashes = [hashlib.sha256("\x1f".join(row).encode("utf-8", "surrogatepass")).hexdigest() for row in zip(*normalized, strict=True)]
        flat = pd.DataFrame({
            "n_messages": len(turns), "n_malformed": 0, "roles": ",".join(names), "last_role": names[-1],
            "n_unknown_roles": 0,
            "n_empty_content": sum(pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(a)), 0)
                                   .to_numpy(zero_copy_only=False).astype("int64") for a in arrays.values()),
            "n_chars": sum(pc.utf8_length(a).to_numpy(zero_copy_only=False) for a in arrays.values()),
        }, index=rows)
        return messages, flat, hashes

    def _scan_messages(self, value: Any) -> tuple[Any, dict[str, int]]:
        if isinstance(value, str):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError:
                return value, {}
        if not isinstance(value, list):
            return value, {}
        contents = [msg.get("content") if isinstance(msg, dict) and isinstance(msg.get("content"), str) else None
                    for msg in value]
        texts, found = scan_pii(contents, self.kinds, redact=self.redact)
        counts: dict[str, int] = {}
        for per_message in found.values():
            for kind, k in per_message.items():
                counts[kind] = counts.get(kind, 0) + k
        if self.redact and found:
            value = [{**msg, "content": texts[k]} if k in found else msg for k, msg in enumerate(value)]
        return value, counts
