"""Quality gate: map records to chat examples, handle PII, drop exact duplicates, run two GX suites.

Records stream through in chunks (bounded memory). Every record read ends in exactly one place:
accepted, quarantined (the failed expectations as reasons) or a duplicate of an earlier record; the
three side files are JSONL in the run folder and the counts reconcile.

Suites (``expectations/``): ``raw_records`` checks the mapped fields; ``chat_examples`` checks each
rendered chat example, flattened to columns because GX does not validate nested JSON. Uniqueness
expectations (``expect_column_values_to_be_unique``) are enforced across the whole run, not per chunk:
the first record with an id is kept, later ones with the same id are quarantined.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import string
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tuneloop.core.config import MappingConfig, QualityConfig, SourceConfig
from tuneloop.core.records import CheckedBatch, ExpectationOutcome, QuarantineEntry, RawBatch, TuneloopError
from tuneloop.tasks.collect import RecordChunk

ROW = "_row"
UNIQUE = "expect_column_values_to_be_unique"
ROLES = {"system", "user", "assistant", "tool", "developer"}


class QualityGateFailed(TuneloopError):
    """The batch as a whole is not fit to train on; nothing downstream runs."""


# ---- PII ----------------------------------------------------------------------------------------------


def luhn_ok(candidate: str) -> bool:
    digits = [int(c) for c in candidate if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    s = candidate.replace(" ", "").upper()
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


@dataclass(frozen=True)
class PiiKind:
    """A kind of personal data: a regex (valid in both RE2 and Python) and an optional checksum."""

    name: str
    pattern: str
    valid: Callable[[str], bool] | None = None


# Order matters: a card number is also a run of digits a phone pattern would take.
PII_KINDS: tuple[PiiKind, ...] = (
    PiiKind("CARD", r"\b(?:\d[ -]?){12,18}\d\b", luhn_ok),
    PiiKind("IBAN", r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]){11,30}\b", iban_ok),
    PiiKind("EMAIL", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"),
    PiiKind("PHONE", r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\b\d{2,4}[ .-]\d{3,4}[ .-]\d{3,5}\b"),
)


def pii_kinds(quality: QualityConfig) -> list[PiiKind]:
    import pyarrow as pa
    import pyarrow.compute as pc

    extra = [PiiKind(name.upper(), pattern) for name, pattern in quality.pii_patterns.items()]
    for kind in extra:
        try:
            re.compile(kind.pattern)
            pc.match_substring_regex(pa.array([""]), pattern=kind.pattern)  # Arrow's RE2 must take it too
        except (re.error, pa.ArrowInvalid) as exc:
            raise TuneloopError(f"quality.pii_patterns.{kind.name.lower()}: not a valid RE2/Python regex ({exc})") from None
    return [*PII_KINDS, *extra]


def scan_pii(values: list[str | None], kinds: list[PiiKind], redact: bool) -> tuple[list[str | None], dict[int, dict[str, int]]]:
    """Find (and optionally replace with [KIND]) PII in a column.

    Returns the column and, for rows with PII, how many matches of each kind. One pass of Arrow's RE2
    over the whole column finds the rows that may hold PII (usually few); only those take the Python
    path that runs each kind's checksum and does the replacing.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    combined = "|".join(f"(?:{k.pattern})" for k in kinds)
    arr = pa.array(values, type=pa.large_string())
    mask = pc.fill_null(pc.match_substring_regex(arr, pattern=combined), False).to_numpy(zero_copy_only=False)
    hits = mask.nonzero()[0]
    found: dict[int, dict[str, int]] = {}
    if len(hits) == 0:
        return values, found
    out = list(values) if redact else values
    for i in hits:
        text = values[i]
        counts: dict[str, int] = {}
        for kind in kinds:
            regex = re.compile(kind.pattern)
            if kind.valid is None:
                text, n = regex.subn(f"[{kind.name}]", text) if redact else (text, len(regex.findall(text)))
            else:
                n = sum(kind.valid(m.group(0)) for m in regex.finditer(text))
                if n and redact:
                    text = regex.sub(lambda m, k=kind: f"[{k.name}]" if k.valid(m.group(0)) else m.group(0), text)
            if n:
                counts[kind.name] = n
        if counts:
            found[int(i)] = counts
            if redact:
                out[i] = text
    return out, found


def redact_pii(text: str, kinds: Iterable[PiiKind] = PII_KINDS) -> tuple[str, int]:
    """One string: for callers outside the gate."""
    values, found = scan_pii([text], list(kinds), redact=True)
    return values[0], sum(found.get(0, {}).values())


# ---- mapping --------------------------------------------------------------------------------------------


def template_fields(mapping: MappingConfig) -> list[str]:
    """The record fields the mapping reads, in first-use order."""
    names: list[str] = []
    if mapping.messages is None:
        for template in (mapping.system, mapping.user, mapping.assistant):
            for _, name, _, _ in string.Formatter().parse(template or ""):
                if name and name not in names:
                    names.append(name)
    return names


def required_fields(mapping: MappingConfig) -> list[str]:
    """Columns a source must have for the mapping to make sense (checked before any work)."""
    names = template_fields(mapping)
    for extra in (mapping.messages, mapping.label):
        if extra and extra not in names:
            names.append(extra)
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


# ---- Great Expectations ---------------------------------------------------------------------------------


def load_suite(path: Path, without: str | None = None) -> tuple[Any, list[dict[str, Any]]]:
    """The suite, and the expectations of type ``without`` taken out of it (run-wide checks)."""
    import great_expectations as gx

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        taken = [e for e in data.get("expectations", []) if e.get("type") == without]
        data["expectations"] = [e for e in data.get("expectations", []) if e.get("type") != without]
        return gx.ExpectationSuite(**data), taken
    except FileNotFoundError:
        raise TuneloopError(f"quality suite {path} does not exist") from None
    except (json.JSONDecodeError, TypeError, ValueError, KeyError, AttributeError) as exc:
        raise TuneloopError(f"quality suite {path} is not a valid expectation suite ({exc})") from None


class SuiteRunner:
    """One GX suite, validated chunk after chunk through a checkpoint."""

    def __init__(self, context, suite):
        import great_expectations as gx

        self.name = suite.name
        asset = context.data_sources.add_pandas(f"{suite.name}-source").add_dataframe_asset(suite.name)
        definition = asset.add_batch_definition_whole_dataframe("chunk")
        suite = context.suites.add(suite)
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{suite.name}-validation", data=definition, suite=suite))
        # results stay in the context's store; Data Docs are built from all of them once, at the end
        self.checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=f"{suite.name}-gate", validation_definitions=[validation], actions=[],
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [ROW]}))
        self.columns = {c for e in suite.expectations if (c := e.configuration.kwargs.get("column"))}
        self.outcomes: dict[tuple[str, str | None], list[int]] = {}  # (type, column) -> [failed chunks, count]

    def run(self, frame) -> dict[int, list[str]]:
        result = self.checkpoint.run(batch_parameters={"dataframe": frame})
        reasons: dict[int, list[str]] = {}
        for validation in result.run_results.values():
            for r in validation.results:
                cfg = r.expectation_config
                column = cfg.kwargs.get("column")
                if r.exception_info and r.exception_info.get("raised_exception"):
                    raise TuneloopError(f"quality suite {self.name}: {cfg.type} on {column!r} could not run:"
                                        f" {r.exception_info.get('exception_message')}")
                unexpected = r.result.get("unexpected_index_list") or []
                tally = self.outcomes.setdefault((cfg.type, column), [0, 0])
                tally[0] += not r.success
                tally[1] += len(unexpected)
                label = f"{cfg.type}({column})" if column else cfg.type
                for item in unexpected:
                    reasons.setdefault(int(item[ROW]), []).append(label)
        return reasons


# ---- the gate -------------------------------------------------------------------------------------------


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


class ChunkPreparer:
    """Maps records to chat examples, handles PII, renders, hashes: everything per-row and order-free."""

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
            sources=chunk.sources, lines=chunk.lines, records=[orjson.dumps(r, default=str) for r in chunk.rows],
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
        normalized = [[f"{r}\x1e" + " ".join(t.split()).casefold() for t in col] for r, col in zip(names, texts, strict=True)]
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


class QualityGate:
    """Feed it prepared chunks in source order, then ``finish()``: a CheckedBatch accounting for every record.

    Holds what depends on order: first-seen duplicates, run-wide uniqueness, the GX context (one per run,
    so Data Docs show every chunk), the counts and the output files.
    """

    def __init__(self, mapping: MappingConfig, quality: QualityConfig, run_dir: Path):
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        for name in ("great_expectations", "great_expectations.data_context.types.base"):  # the latter pins INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        self.mapping, self.quality, self.run_dir = mapping, quality, run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.fields = [f for f in all_fields(mapping) if f != mapping.messages]

        # uniqueness is a property of the whole run, not of a chunk: enforced here, reported with the suite
        raw_suite, unique = load_suite(quality.suite, without=UNIQUE)
        chat_suite, _ = load_suite(quality.chat_suite)
        self.unique_columns = [e["kwargs"]["column"] for e in unique]
        missing = sorted((self._suite_columns(raw_suite) | set(self.unique_columns)) - set(self.fields))
        if missing:
            raise TuneloopError(
                f"quality suite {quality.suite} checks {', '.join(missing)}, which the mapping does not read"
                f" (mapped fields: {', '.join(self.fields)}); add them to mapping.metadata or edit the suite")
        self.raw_suite_name, self.chat_suite_name = raw_suite.name, chat_suite.name

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.docs_dir = run_dir / "data_docs" if quality.data_docs else None
        if self.docs_dir:
            context.add_data_docs_site(site_name="run", site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(self.docs_dir)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            })
        self.context = context
        self.raw = SuiteRunner(context, raw_suite)
        self.chat = SuiteRunner(context, chat_suite)

        self.paths = {name: run_dir / f"{name}.jsonl" for name in ("accepted", "quarantine", "duplicates")}
        self.out = {name: path.open("wb") for name, path in self.paths.items()}
        self.seen: dict[bytes, tuple[str, int]] = {}
        self.ids: dict[str, dict[str, tuple[str, int]]] = {c: {} for c in self.unique_columns}
        self.unique_failures = dict.fromkeys(self.unique_columns, 0)
        self.n_read = self.n_accepted = self.n_quarantined = self.n_duplicates = self.n_redacted = 0

    @staticmethod
    def _suite_columns(suite) -> set[str]:
        return {c for e in suite.expectations if (c := e.configuration.kwargs.get("column"))}

    def _quarantine(self, source: str, line: int, reasons: list[str], record: Any) -> None:
        self.n_quarantined += 1
        entry = QuarantineEntry(source=source, line=line, reasons=reasons, record=record)
        self.out["quarantine"].write(orjson.dumps(entry.model_dump(), default=str) + b"\n")

    def add(self, chunk: PreparedChunk) -> None:
        import pandas as pd

        self.n_read += len(chunk.keys) + len(chunk.unreadable)
        self.n_redacted += chunk.n_redacted
        for entry in chunk.unreadable:
            self._quarantine(entry.source, entry.line, entry.reasons, entry.record)
        if not chunk.keys:
            return
        # exact duplicates first, so they are counted once and never quarantined
        keep: list[int] = []
        for i, key in enumerate(chunk.keys):
            origin = self.seen.get(key)
            if origin is not None:
                self.n_duplicates += 1
                self.out["duplicates"].write(orjson.dumps({
                    "source": chunk.sources[i], "line": chunk.lines[i],
                    "duplicate_of": {"source": origin[0], "line": origin[1]}}) + b"\n")
                continue
            self.seen[key] = (chunk.sources[i], chunk.lines[i])
            keep.append(i)

        frame = pd.DataFrame({n: [chunk.columns[n][i] for i in keep] for n in self.fields}).astype(object)
        frame = frame.where(frame.notna(), None)
        frame[ROW] = range(len(keep))
        reasons = self.raw.run(frame)
        for j, i in enumerate(keep):
            for col in self.unique_columns:
                value = chunk.columns[col][i]
                if value is None:
                    continue
                first = self.ids[col].setdefault(str(value), (chunk.sources[i], chunk.lines[i]))
                if first != (chunk.sources[i], chunk.lines[i]):
                    self.unique_failures[col] += 1
                    reasons.setdefault(j, []).append(f"{UNIQUE}({col})")
            if i in chunk.pii_reasons:
                reasons.setdefault(j, []).extend(chunk.pii_reasons[i])

        passing = [j for j in range(len(keep)) if j not in reasons]
        if passing:
            flat = chunk.flat.iloc[[keep[j] for j in passing]].reset_index(drop=True)
            flat[ROW] = range(len(passing))
            for k, why in self.chat.run(flat).items():
                reasons.setdefault(passing[k], []).extend(why)

        write = self.out["accepted"].write
        for j, i in enumerate(keep):
            if j in reasons:
                self._quarantine(chunk.sources[i], chunk.lines[i], reasons[j], orjson.loads(chunk.records[i]))
            else:
                write(chunk.examples[i])
                self.n_accepted += 1

    def outcomes(self) -> list[ExpectationOutcome]:
        result = [
            ExpectationOutcome(suite=self.raw_suite_name, expectation=UNIQUE, column=col,
                               success=self.unique_failures[col] == 0, unexpected_count=self.unique_failures[col])
            for col in self.unique_columns
        ]
        for runner in (self.raw, self.chat):
            result += [ExpectationOutcome(suite=runner.name, expectation=t, column=c, success=tally[0] == 0,
                                          unexpected_count=tally[1]) for (t, c), tally in runner.outcomes.items()]
        return result

    def finish(self) -> CheckedBatch:
        for fh in self.out.values():
            fh.close()
        if self.docs_dir:
            self.context.build_data_docs(site_names=["run"])
        summary_path = self.run_dir / "quality_summary.json"
        checked = CheckedBatch(
            accepted_path=self.paths["accepted"], quarantine_path=self.paths["quarantine"],
            duplicates_path=self.paths["duplicates"], summary_path=summary_path,
            data_docs=(self.docs_dir / "index.html") if self.docs_dir and (self.docs_dir / "index.html").exists() else None,
            n_read=self.n_read, n_accepted=self.n_accepted, n_quarantined=self.n_quarantined,
            n_duplicates=self.n_duplicates, n_redacted=self.n_redacted, expectations=self.outcomes(),
        )
        if checked.n_read != checked.n_accepted + checked.n_quarantined + checked.n_duplicates:
            raise RuntimeError(f"records lost: {checked.n_read} read, {checked.n_accepted} + "
                               f"{checked.n_quarantined} + {checked.n_duplicates} accounted for")
        summary_path.write_bytes(orjson.dumps(
            checked.model_dump(mode="json", exclude={"summary_path"}), option=orjson.OPT_INDENT_2))
        return checked


def _prepare_in_subprocess(raw: RawBatch, source: SourceConfig, mapping: MappingConfig, quality: QualityConfig,
                           queue) -> None:
    """Producer process: read and prepare chunks; the parent validates them meanwhile (two cores busy)."""
    from tuneloop.tasks.collect import read_chunks

    try:
        preparer = ChunkPreparer(mapping, quality)
        for chunk in read_chunks(raw, source):
            queue.put(preparer.prepare(chunk))
        queue.put(None)
    except BaseException as exc:  # handed to the parent, which raises it where the user sees it
        queue.put(exc if isinstance(exc, TuneloopError) else RuntimeError(f"{type(exc).__name__}: {exc}"))


def prepared_chunks(raw: RawBatch, source: SourceConfig, mapping: MappingConfig, quality: QualityConfig,
                    in_subprocess: bool) -> Iterator[PreparedChunk]:
    if not in_subprocess:
        from tuneloop.tasks.collect import read_chunks

        preparer = ChunkPreparer(mapping, quality)
        for chunk in read_chunks(raw, source):
            yield preparer.prepare(chunk)
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # never fork a process that runs Prefect's threads
    queue = ctx.Queue(maxsize=2)  # bounded: at most a few chunks in memory
    proc = ctx.Process(target=_prepare_in_subprocess, args=(raw, source, mapping, quality, queue), daemon=True)
    proc.start()
    try:
        while True:
            item = queue.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()


def use_subprocess(raw: RawBatch, quality: QualityConfig) -> bool:
    """Two cores pay off once a batch is large enough to amortize starting a process (~1 s)."""
    if quality.prepare_in_subprocess != "auto":
        return quality.prepare_in_subprocess == "always"
    size = sum(f.size for f in raw.files) + (raw.sql.n_rows * 500 if raw.sql else 0)
    return size >= 32 * 2**20 and (os.cpu_count() or 1) > 1


def check_batch(raw: RawBatch, source: SourceConfig, mapping: MappingConfig, quality: QualityConfig,
                run_dir: Path) -> CheckedBatch:
    gate = QualityGate(mapping, quality, run_dir)
    for chunk in prepared_chunks(raw, source, mapping, quality, use_subprocess(raw, quality)):
        gate.add(chunk)
    return gate.finish()


def read_accepted(path: Path) -> Iterable[dict[str, Any]]:
    with path.open("rb") as fh:
        for line in fh:
            if line.strip():
                yield orjson.loads(line)


def enforce_quarantine_limit(checked: CheckedBatch, quality: QualityConfig) -> None:
    if checked.quarantined_fraction > quality.max_quarantine_fraction:
        raise QualityGateFailed(
            f"quality gate failed: {checked.n_quarantined} of {checked.n_read} records quarantined"
            f" ({checked.quarantined_fraction:.1%} > quality.max_quarantine_fraction"
            f" {quality.max_quarantine_fraction:.1%}); reasons in {checked.quarantine_path}"
        )


def enforce_min_examples(n_examples: int, quality: QualityConfig, what: str = "examples accepted") -> None:
    if n_examples < quality.min_examples:
        raise QualityGateFailed(
            f"quality gate failed: {n_examples} {what}, quality.min_examples is {quality.min_examples}"
        )


def enforce_gate(checked: CheckedBatch, quality: QualityConfig) -> None:
    """The gate for one batch on its own (``tuneloop check``); the flow checks min_examples on the snapshot."""
    enforce_quarantine_limit(checked, quality)
    enforce_min_examples(checked.n_accepted, quality)


def summary_markdown(checked: CheckedBatch) -> str:
    lines = [
        "## Quality gate",
        "",
        "| read | accepted | quarantined | duplicates | PII redacted |",
        "|---:|---:|---:|---:|---:|",
        f"| {checked.n_read} | {checked.n_accepted} | {checked.n_quarantined} | {checked.n_duplicates}"
        f" | {checked.n_redacted} |",
        "",
        "| suite | expectation | column | result | unexpected |",
        "|---|---|---|---|---:|",
    ]
    for o in checked.expectations:
        lines.append(f"| {o.suite} | {o.expectation} | {o.column or ''} | {'pass' if o.success else 'FAIL'}"
                     f" | {o.unexpected_count} |")
    lines += ["", f"Quarantine: `{checked.quarantine_path}`", f"Duplicates: `{checked.duplicates_path}`"]
    if checked.data_docs:
        lines.append(f"Data Docs: `{checked.data_docs}`")
    return "\n".join(lines)


@task(name="quality", cache_policy=NO_CACHE)
def quality_task(raw, source, mapping: MappingConfig, quality: QualityConfig, run_dir: Path) -> CheckedBatch:
    checked = check_batch(raw, source, mapping, quality, run_dir)
    create_markdown_artifact(summary_markdown(checked), key="quality-gate", description="quality gate outcome")
    get_run_logger().info(
        f"quality: read {checked.n_read} = accepted {checked.n_accepted} + quarantined {checked.n_quarantined}"
        f" + duplicates {checked.n_duplicates}; {checked.n_redacted} PII matches redacted"
        + (f"; Data Docs: {checked.data_docs}" if checked.data_docs else ""))
    enforce_quarantine_limit(checked, quality)
    return checked
