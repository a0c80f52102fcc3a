"""Quality gate: map records to chat examples, redact PII, drop exact duplicates, run the GX suite.

Every record read ends in exactly one place: accepted, quarantined (with the failed expectations as
reasons) or counted as a duplicate of an earlier record. Both side files are JSONL in the run folder.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import string
from pathlib import Path
from typing import Any

import orjson
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from flows.config import MappingConfig, QualityConfig
from tasks.records import (
    ChatExample,
    CheckedBatch,
    ExpectationOutcome,
    QuarantineEntry,
    RawBatch,
    Record,
    TuneloopError,
)

# Personal data that must not leave the company: detected in every mapped text field.
PII_PATTERNS: dict[str, re.Pattern[str]] = {
    "EMAIL": re.compile(r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"),
    "PHONE": re.compile(r"\+?\d[\d ().-]{7,}\d"),
}
ROW = "_row"


class QualityGateFailed(TuneloopError):
    """The batch as a whole is not fit to train on; nothing downstream runs."""


def template_fields(mapping: MappingConfig) -> list[str]:
    """The record fields the mapping reads, in first-use order."""
    names: list[str] = []
    for template in (mapping.system, mapping.user, mapping.assistant):
        for _, name, _, _ in string.Formatter().parse(template or ""):
            if name and name not in names:
                names.append(name)
    for extra in (mapping.id, mapping.label):
        if extra and extra not in names:
            names.append(extra)
    return names


def redact_pii(text: str) -> tuple[str, int]:
    count = 0
    for name, pattern in PII_PATTERNS.items():
        text, n = pattern.subn(f"[{name}]", text)
        count += n
    return text, count


def _normalize(text: str) -> str:
    return " ".join(text.split()).casefold()


def content_hash(messages: list[dict[str, str]]) -> str:
    """Hash of the example's meaning, not its bytes: case and whitespace do not make a new example."""
    canonical = [[m["role"], _normalize(m["content"])] for m in messages]
    return hashlib.sha256(orjson.dumps(canonical)).hexdigest()


def render_messages(mapping: MappingConfig, fields: dict[str, Any]) -> list[dict[str, str]]:
    messages = []
    if mapping.system:
        messages.append({"role": "system", "content": mapping.system.format(**fields)})
    messages.append({"role": "user", "content": mapping.user.format(**fields)})
    messages.append({"role": "assistant", "content": mapping.assistant.format(**fields)})
    return messages


def load_suite(path: Path):
    import great_expectations as gx

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return gx.ExpectationSuite(**data)
    except FileNotFoundError:
        raise TuneloopError(f"quality.suite: {path} does not exist") from None
    except (json.JSONDecodeError, TypeError, ValueError) as exc:
        raise TuneloopError(f"quality.suite: {path} is not a valid expectation suite ({exc})") from None


def run_suite(frame, suite_path: Path) -> tuple[list[ExpectationOutcome], dict[int, list[str]]]:
    """Validate with Great Expectations; return each expectation's outcome and the failing rows' reasons."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    for name in ("great_expectations", "great_expectations.data_context.types.base"):  # the latter pins INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    suite = load_suite(suite_path)
    missing = sorted(
        {c for e in suite.expectations if (c := e.configuration.kwargs.get("column")) and c not in frame.columns}
    )
    if missing:
        raise TuneloopError(
            f"quality.suite: {suite_path} checks column(s) {', '.join(missing)} that no record has"
            f" (columns seen: {', '.join(c for c in frame.columns if c != ROW)})"
        )
    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    batch = context.data_sources.add_pandas("records").add_dataframe_asset("batch")
    definition = batch.add_batch_definition_whole_dataframe("whole")
    suite = context.suites.add(suite)
    validation = context.validation_definitions.add(gx.ValidationDefinition(name="gate", data=definition, suite=suite))
    result = validation.run(
        batch_parameters={"dataframe": frame},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [ROW]},
    )
    outcomes: list[ExpectationOutcome] = []
    reasons: dict[int, list[str]] = {}
    for r in result.results:
        cfg = r.expectation_config
        column = cfg.kwargs.get("column")
        if r.exception_info and r.exception_info.get("raised_exception"):
            raise TuneloopError(
                f"quality.suite: {suite_path}: {cfg.type} on {column!r} could not run:"
                f" {r.exception_info.get('exception_message')}"
            )
        unexpected = r.result.get("unexpected_index_list") or []
        outcomes.append(ExpectationOutcome(expectation=cfg.type, column=column, success=bool(r.success),
                                           unexpected_count=len(unexpected)))
        label = f"{cfg.type}({column})" if column else cfg.type
        for item in unexpected:
            reasons.setdefault(int(item[ROW]), []).append(label)
    return outcomes, reasons


def check_batch(raw: RawBatch, mapping: MappingConfig, quality: QualityConfig, run_dir: Path) -> CheckedBatch:
    """The gate. Raises QualityGateFailed when too much is quarantined or too little is left."""
    import pandas as pd

    fields = template_fields(mapping)
    run_dir.mkdir(parents=True, exist_ok=True)
    quarantine: list[QuarantineEntry] = list(raw.unreadable)
    duplicates: list[dict[str, Any]] = []
    first_seen: dict[str, Record] = {}
    kept: list[Record] = []
    rows: list[dict[str, Any]] = []
    redacted = 0
    for record in raw.records:
        row = {name: record.fields.get(name) for name in fields}
        for name, value in row.items():
            if value is not None and not isinstance(value, str):
                row[name] = str(value)
            if quality.pii == "redact" and isinstance(row[name], str):
                row[name], n = redact_pii(row[name])
                redacted += n
            if isinstance(row[name], str):
                row[name] = row[name].strip()
        # Exact duplicates are decided before the suite, so the uniqueness check sees each record once.
        key = hashlib.sha256(orjson.dumps(row, option=orjson.OPT_SORT_KEYS)).hexdigest()
        if key in first_seen:
            original = first_seen[key]
            duplicates.append({"source": record.source, "line": record.line,
                               "duplicate_of": {"source": original.source, "line": original.line}})
            continue
        first_seen[key] = record
        row[ROW] = len(kept)
        kept.append(record)
        rows.append(row)

    frame = pd.DataFrame.from_records(rows, columns=[*fields, ROW]).astype(object)
    frame = frame.where(frame.notna(), None)
    outcomes, reasons = run_suite(frame, quality.suite) if rows else ([], {})

    accepted: list[ChatExample] = []
    for i, record in enumerate(kept):
        if i in reasons:
            quarantine.append(QuarantineEntry(source=record.source, line=record.line, reasons=reasons[i],
                                              record=record.fields))
            continue
        values = {k: v for k, v in rows[i].items() if k != ROW}
        messages = render_messages(mapping, values)
        accepted.append(ChatExample(
            messages=messages,
            label=values.get(mapping.label) if mapping.label else None,
            record_id=str(values.get(mapping.id) or f"{Path(record.source).name}:{record.line}"),
            source=record.source,
            line=record.line,
            content_hash=content_hash(messages),
        ))

    quarantine_path = run_dir / "quarantine.jsonl"
    duplicates_path = run_dir / "duplicates.jsonl"
    quarantine_path.write_bytes(b"".join(orjson.dumps(q.model_dump()) + b"\n" for q in quarantine))
    duplicates_path.write_bytes(b"".join(orjson.dumps(d) + b"\n" for d in duplicates))
    checked = CheckedBatch(
        accepted=accepted, quarantine_path=quarantine_path, duplicates_path=duplicates_path,
        n_read=raw.n_read, n_quarantined=len(quarantine), n_duplicates=len(duplicates), n_redacted=redacted,
        expectations=outcomes,
    )
    assert checked.n_read == checked.n_accepted + checked.n_quarantined + checked.n_duplicates, "records lost"
    return checked


def enforce_gate(checked: CheckedBatch, quality: QualityConfig) -> None:
    if checked.quarantined_fraction > quality.max_quarantine_fraction:
        raise QualityGateFailed(
            f"quality gate failed: {checked.n_quarantined} of {checked.n_read} records quarantined"
            f" ({checked.quarantined_fraction:.1%} > quality.max_quarantine_fraction"
            f" {quality.max_quarantine_fraction:.1%}); reasons in {checked.quarantine_path}"
        )
    if checked.n_accepted < quality.min_examples:
        raise QualityGateFailed(
            f"quality gate failed: {checked.n_accepted} examples accepted, quality.min_examples is"
            f" {quality.min_examples}; reasons in {checked.quarantine_path}"
        )


def summary_markdown(checked: CheckedBatch) -> str:
    lines = [
        "## Quality gate",
        "",
        "| read | accepted | quarantined | duplicates | PII redacted |",
        "|---:|---:|---:|---:|---:|",
        f"| {checked.n_read} | {checked.n_accepted} | {checked.n_quarantined} | {checked.n_duplicates}"
        f" | {checked.n_redacted} |",
        "",
        "| expectation | column | result | unexpected |",
        "|---|---|---|---:|",
    ]
    for o in checked.expectations:
        lines.append(f"| {o.expectation} | {o.column or ''} | {'pass' if o.success else 'FAIL'} | {o.unexpected_count} |")
    lines += ["", f"Quarantine: `{checked.quarantine_path}`", f"Duplicates: `{checked.duplicates_path}`"]
    return "\n".join(lines)


@task(name="quality", cache_policy=NO_CACHE)
def quality_task(raw: RawBatch, mapping: MappingConfig, quality: QualityConfig, run_dir: Path) -> CheckedBatch:
    checked = check_batch(raw, mapping, quality, run_dir)
    create_markdown_artifact(summary_markdown(checked), key="quality-gate", description="quality gate outcome")
    get_run_logger().info(f"quality: read {checked.n_read} = accepted {checked.n_accepted} + quarantined {checked.n_quarantined}"
          f" + duplicates {checked.n_duplicates}; {checked.n_redacted} PII matches redacted")
    enforce_gate(checked, quality)
    return checked
