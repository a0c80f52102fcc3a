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
import re
import string
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.config import MappingConfig, QualityConfig
from tasks.collect import RecordChunk
from tasks.records import CheckedBatch, ExpectationOutcome, QuarantineEntry, TuneloopError

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
    extra = [PiiKind(name.upper(), pattern) for name, pattern in quality.pii_patterns.items()]
    for kind in extra:
        try:
            re.compile(kind.pattern)
        except re.error as exc:
            raise TuneloopError(f"quality.pii_patterns.{kind.name.lower()}: not a valid regex ({exc})") from None
    return [*PII_KINDS, *extra]


def scan_pii(values: list[str | None], kinds: list[PiiKind], redact: bool) -> tuple[list[str | None], list[list[str]]]:
    """Find (and optionally replace with [KIND]) PII in a column; returns the column and each row's kinds.

    Whole columns go through Arrow's RE2 kernels; only rows that match a checksummed kind's pattern take
    the slower Python path that runs the checksum.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    found: list[list[str]] = [[] for _ in values]
    arr = pa.array(values, type=pa.large_string())
    for kind in kinds:
        if kind.valid is None:
            counts = pc.count_substring_regex(arr, pattern=kind.pattern).to_numpy(zero_copy_only=False)
            hit = counts.nonzero()[0]
            if len(hit) == 0:
                continue
            for i in hit:
                found[i].append(kind.name)
            if redact:
                arr = pc.replace_substring_regex(arr, pattern=kind.pattern, replacement=f"[{kind.name}]")
            continue
        mask = pc.fill_null(pc.match_substring_regex(arr, pattern=kind.pattern), False).to_numpy(zero_copy_only=False)
        hit = mask.nonzero()[0]
        if len(hit) == 0:
            continue
        regex = re.compile(kind.pattern)
        current = arr.to_pylist()
        for i in hit:
            text = current[i]
            if not any(kind.valid(m.group(0)) for m in regex.finditer(text)):
                continue
            found[i].append(kind.name)
            if redact:
                current[i] = regex.sub(lambda m, k=kind: f"[{k.name}]" if k.valid(m.group(0)) else m.group(0), text)
        arr = pa.array(current, type=pa.large_string())
    return arr.to_pylist(), found


def redact_pii(text: str, kinds: Iterable[PiiKind] = PII_KINDS) -> tuple[str, int]:
    """One string: for messages columns and for callers outside the gate."""
    values, found = scan_pii([text], list(kinds), redact=True)
    return values[0], len(found[0])


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


def _normalize(text: str) -> str:
    return " ".join(text.split()).casefold()


def content_hash(messages: list[dict[str, Any]]) -> str:
    """Hash of the example's meaning, not its bytes: case and whitespace do not make a new example."""
    canonical = [[m.get("role"), _normalize(str(m.get("content") or ""))] for m in messages]
    return hashlib.sha256(orjson.dumps(canonical)).hexdigest()


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
    """One GX suite, validated chunk after chunk through a checkpoint that can also update Data Docs."""

    def __init__(self, context, suite, docs_site: str | None):
        import great_expectations as gx
        from great_expectations.checkpoint import UpdateDataDocsAction

        self.name = suite.name
        asset = context.data_sources.add_pandas(f"{suite.name}-source").add_dataframe_asset(suite.name)
        definition = asset.add_batch_definition_whole_dataframe("chunk")
        suite = context.suites.add(suite)
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{suite.name}-validation", data=definition, suite=suite))
        actions = [UpdateDataDocsAction(name="docs", site_names=[docs_site])] if docs_site else []
        self.checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=f"{suite.name}-gate", validation_definitions=[validation], actions=actions,
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


class QualityGate:
    """Feed it chunks, then ``finish()``: a CheckedBatch with every record accounted for."""

    def __init__(self, mapping: MappingConfig, quality: QualityConfig, run_dir: Path):
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        for name in ("great_expectations", "great_expectations.data_context.types.base"):  # the latter pins INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        self.mapping, self.quality, self.run_dir = mapping, quality, run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.fields = all_fields(mapping)
        self.text_fields = template_fields(mapping)
        self.kinds = pii_kinds(quality)

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
        self.raw = SuiteRunner(context, raw_suite, "run" if self.docs_dir else None)
        self.chat = SuiteRunner(context, chat_suite, "run" if self.docs_dir else None)

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

    def add(self, chunk: RecordChunk) -> None:
        import pandas as pd

        self.n_read += len(chunk)
        for entry in chunk.unreadable:
            self._quarantine(entry.source, entry.line, entry.reasons, entry.record)
        if not chunk.rows:
            return
        m = self.mapping
        columns: dict[str, list[Any]] = {}
        for name in self.fields:
            values = [r.get(name) for r in chunk.rows]
            if name != m.messages:  # a number where text is expected is read as its text
                values = [v if v is None or isinstance(v, str) else orjson.dumps(v).decode()
                          if isinstance(v, dict | list) else str(v) for v in values]
                values = [v.strip() if isinstance(v, str) else v for v in values]
            columns[name] = values

        pii_reasons: dict[int, list[str]] = {}
        redact = self.quality.pii == "redact"
        for name in self.text_fields:
            columns[name], found = scan_pii(columns[name], self.kinds, redact=redact)
            for i, kinds in enumerate(found):
                if kinds:
                    self.n_redacted += len(kinds) if redact else 0
                    if not redact:
                        pii_reasons.setdefault(i, []).extend(f"pii:{k}({name})" for k in kinds)
        if m.messages:
            for i, value in enumerate(columns[m.messages]):
                columns[m.messages][i], found = self._scan_messages(value, redact)
                if found and not redact:
                    pii_reasons.setdefault(i, []).extend(f"pii:{k}({m.messages})" for k in found)
                elif found:
                    self.n_redacted += len(found)

        # exact duplicates first (by mapped content), so they are counted once and never quarantined
        keep: list[int] = []
        for i in range(len(chunk.rows)):
            key = hashlib.sha256(orjson.dumps([columns[n][i] for n in self.fields], default=str)).digest()[:16]
            origin = self.seen.get(key)
            if origin is not None:
                self.n_duplicates += 1
                self.out["duplicates"].write(orjson.dumps({
                    "source": chunk.sources[i], "line": chunk.lines[i],
                    "duplicate_of": {"source": origin[0], "line": origin[1]}}) + b"\n")
                continue
            self.seen[key] = (chunk.sources[i], chunk.lines[i])
            keep.append(i)

        frame = pd.DataFrame({n: [columns[n][i] for i in keep] for n in self.fields}).astype(object)
        frame = frame.where(frame.notna(), None)
        frame[ROW] = range(len(keep))
        reasons = self.raw.run(frame)
        for j, i in enumerate(keep):
            for col in self.unique_columns:
                value = columns[col][i]
                if value is None:
                    continue
                first = self.ids[col].setdefault(str(value), (chunk.sources[i], chunk.lines[i]))
                if first != (chunk.sources[i], chunk.lines[i]):
                    self.unique_failures[col] += 1
                    reasons.setdefault(j, []).append(f"{UNIQUE}({col})")
            if i in pii_reasons:
                reasons.setdefault(j, []).extend(pii_reasons[i])

        rendered: dict[int, list[dict[str, Any]]] = {}
        flat: list[dict[str, Any]] = []
        for j, i in enumerate(keep):
            if j in reasons:
                continue
            values = {n: columns[n][i] for n in self.fields}
            rendered[j] = render_messages(m, values)
            flat.append({**flatten_chat(rendered[j]), ROW: j})
        chat_reasons = self.chat.run(pd.DataFrame(flat)) if flat else {}
        for k, row in enumerate(flat):
            if k in chat_reasons:
                reasons.setdefault(row[ROW], []).extend(chat_reasons[k])

        write = self.out["accepted"].write
        for j, i in enumerate(keep):
            if j in reasons:
                self._quarantine(chunk.sources[i], chunk.lines[i], reasons[j], chunk.rows[i])
                continue
            messages = rendered[j]
            label = columns[m.label][i] if m.label else None
            record_id = columns[m.id][i] if m.id in columns else None
            write(orjson.dumps({
                "messages": messages,
                "label": None if label is None else str(label),
                "record_id": str(record_id) if record_id is not None else f"{Path(chunk.sources[i]).name}:{chunk.lines[i]}",
                "source": chunk.sources[i],
                "line": chunk.lines[i],
                "content_hash": content_hash(messages),
                "metadata": {k: columns[k][i] for k in m.metadata},
            }, default=str) + b"\n")
            self.n_accepted += 1

    def _scan_messages(self, value: Any, redact: bool) -> tuple[Any, list[str]]:
        if isinstance(value, str):
            try:
                value = orjson.loads(value)
            except orjson.JSONDecodeError:
                return value, []
        if not isinstance(value, list):
            return value, []
        found: list[str] = []
        out = []
        for msg in value:
            if isinstance(msg, dict) and isinstance(msg.get("content"), str):
                texts, kinds = scan_pii([msg["content"]], self.kinds, redact=redact)
                found.extend(kinds[0])
                msg = {**msg, "content": texts[0]} if redact else msg
            out.append(msg)
        return out, found

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


def check_batch(chunks: Iterable[RecordChunk], mapping: MappingConfig, quality: QualityConfig,
                run_dir: Path) -> CheckedBatch:
    gate = QualityGate(mapping, quality, run_dir)
    for chunk in chunks:
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
    from tasks.collect import read_chunks

    checked = check_batch(read_chunks(raw, source), mapping, quality, run_dir)
    create_markdown_artifact(summary_markdown(checked), key="quality-gate", description="quality gate outcome")
    get_run_logger().info(
        f"quality: read {checked.n_read} = accepted {checked.n_accepted} + quarantined {checked.n_quarantined}"
        f" + duplicates {checked.n_duplicates}; {checked.n_redacted} PII matches redacted"
        + (f"; Data Docs: {checked.data_docs}" if checked.data_docs else ""))
    enforce_quarantine_limit(checked, quality)
    return checked
