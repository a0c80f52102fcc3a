"""Profile a sample of records and propose a starting pipeline for it: what ``tuneloop init`` writes.

Plain functions, no Prefect and no Great Expectations. From a sample (a JSONL, CSV or Parquet file, or rows
of a SQL table) they propose the id field, the label field (classification) or the answer field
(generation), the text fields the user message is made of, a quality suite for *these* columns and a
held-out split. Values are read as the pipeline reads them (CSV: every value a string; JSONL: JSON types;
Parquet and SQL: their own types, SQL times as ISO text) and measured as the mapping sees them (strings
stripped, any other value as its text), so the suite's bounds and label set hold for what the gate checks.
"""

from __future__ import annotations

import csv
import math
import random
import re
import sys
from dataclasses import dataclass, field
from datetime import date, datetime
from pathlib import Path
from typing import Any, Literal

import orjson

from tuneloop.core.records import TuneloopError

FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet",
           ".pq": "parquet"}  # what the landing folder reads (lib.sources.FORMATS)
MAX_LABELS = 50  # more distinct values than this is not a label set a person checks by eye
MAX_LABEL_CHARS = 60
MAX_MISSING = 0.05  # a field missing more often than this would quarantine more than the gate allows
CONTROL_CHARS = r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]"  # as in the bundled suite: not \t, \n, \r
Task = Literal["classification", "generation"]

ID_NAMES = {"id", "uuid", "guid", "key", "pk"}
LABEL_NAMES = {"label", "labels", "class", "category", "categories", "department", "queue", "intent", "topic",
               "sentiment", "target", "tag", "type", "genre", "team", "group", "kind", "classification"}
ANSWER_NAMES = {"answer", "reply", "response", "output", "completion", "summary", "resolution", "solution",
                "assistant", "highlights", "abstract", "rewrite", "translation", "reference", "target"}
UPDATED_NAMES = {"updated", "modified", "changed", "mtime", "timestamp", "ts"}
TIME_NAMES = UPDATED_NAMES | {"created", "inserted", "date", "time", "at", "datetime"}


def name_tokens(name: str) -> list[str]:
    """``reviewText`` / ``review_text`` / ``Review-Text`` -> ["review", "text"]."""
    spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", name)
    return [t for t in re.split(r"[^A-Za-z0-9]+", spaced.lower()) if t]


def as_text(value: Any) -> str | None:
    """A value as the mapping hands it to the templates and the suite (core.mapping.RecordMapper.prepare)."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, dict | list):
        return orjson.dumps(value).decode()
    return str(value)


# ---- reading ------------------------------------------------------------------------------------------


@dataclass
class Sample:
    """Records as the pipeline would read them, and where they came from (for messages)."""

    rows: list[dict[str, Any]]
    where: str  # the file, or the table at its URL without password
    fmt: str  # jsonl | csv | parquet | sql
    n_unreadable: int = 0
    column_types: dict[str, str] = field(default_factory=dict)  # SQL: declared types


def read_sample(path: Path, limit: int) -> Sample:
    """The first ``limit`` records of a landing-folder file; unreadable lines are counted, not fatal."""
    if not path.is_file():
        raise TuneloopError(f"{path}: no such file")
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise TuneloopError(f"{path}: unknown format {path.suffix!r} (known: {', '.join(sorted(FORMATS))})")
    rows: list[dict[str, Any]] = []
    bad = 0
    if fmt == "jsonl":
        with path.open("rb") as fh:
            for raw in fh:
                if not raw.strip():
                    continue
                try:
                    row = orjson.loads(raw)
                except orjson.JSONDecodeError:
                    bad += 1
                    continue
                if isinstance(row, dict):
                    rows.append(row)
                else:
                    bad += 1
                if len(rows) >= limit:
                    break
    elif fmt == "csv":
        csv.field_size_limit(sys.maxsize)
        with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            for values in reader:
                if not values:
                    continue
                if header is None or len(values) != len(header):
                    bad += 1
                    continue
                rows.append(dict(zip(header, values, strict=True)))
                if len(rows) >= limit:
                    break
    else:
        import pyarrow.parquet as pq

        try:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=min(limit, 10_000)):
                rows.extend(batch.to_pylist())
                if len(rows) >= limit:
                    break
        except Exception as exc:
            raise TuneloopError(f"{path}: unreadable Parquet file ({type(exc).__name__}: {exc})") from None
        rows = rows[:limit]
    if not rows:
        why = f" ({bad} unreadable lines)" if bad else " (empty file)" if path.stat().st_size == 0 else ""
        raise TuneloopError(f"{path}: no records{why}")
    return Sample(rows=rows, where=str(path), fmt=fmt, n_unreadable=bad)


def read_sql_sample(url: str, table: str, limit: int) -> Sample:
    """The first ``limit`` rows of a table through SQLAlchemy, times as ISO text (as the SQL source reads them)."""
    import os

    from sqlalchemy import MetaData, Table, create_engine, inspect, select
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchTableError, SQLAlchemyError

    from tuneloop.core.config import driver_hint

    expanded = os.path.expandvars(url)
    try:
        shown = make_url(expanded).render_as_string(hide_password=True)
        engine = create_engine(expanded)
    except (ArgumentError, ValueError) as exc:
        raise TuneloopError(f"--sql-url: not a SQLAlchemy URL ({exc})") from None
    except ImportError as exc:
        raise TuneloopError(f"--sql-url {shown}: its database driver is not installed ({exc}): {driver_hint(exc.name)}") from None
    where = f"{shown} table {table}"
    try:
        with engine.connect() as conn:
            try:
                tbl = Table(table, MetaData(), autoload_with=conn)
            except NoSuchTableError:
                names = inspect(conn).get_table_names()
                raise TuneloopError(f"--table {table}: no such table at {shown} (tables: {', '.join(names) or 'none'})"
                                    ) from None
            types = {str(c.name): str(c.type) for c in tbl.columns}
            result = conn.execute(select(tbl).limit(limit)).mappings()
            # keys as plain str: SQLAlchemy's quoted_name (a str subclass) is not a JSON key to orjson
            rows = [{str(k): v.isoformat() if isinstance(v, datetime | date) else v for k, v in r.items()}
                    for r in result]
    except SQLAlchemyError as exc:
        first = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise TuneloopError(f"{shown}: {type(exc).__name__}: {first}") from None
    finally:
        engine.dispose()
    if not rows:
        raise TuneloopError(f"{where}: no records (empty table)")
    return Sample(rows=rows, where=where, fmt="sql", column_types=types)


# ---- profiling ----------------------------------------------------------------------------------------


Kind = Literal["string", "number", "bool", "datetime", "messages", "nested", "empty"]


@dataclass
class ColumnProfile:
    name: str
    kind: Kind
    n: int  # records in the sample
    n_missing: int  # absent, null or blank
    n_distinct: int
    integer: bool = False  # numbers: all whole
    p50: int = 0  # lengths of the value's text, in characters
    p99: int = 0
    longest: int = 0
    whitespace_share: float = 0.0  # values with a space or line break inside
    multiline: bool = False  # some value spans lines
    n_control: int = 0  # values with control characters other than tab and line breaks
    counts: dict[str, int] = field(default_factory=dict)  # value -> records, when at most MAX_LABELS distinct

    @property
    def missing_share(self) -> float:
        return self.n_missing / self.n if self.n else 1.0

    @property
    def unique(self) -> bool:
        return self.n_missing == 0 and self.n_distinct == self.n

    @property
    def categorical(self) -> bool:
        """A few values, each repeated: the shape of a label set."""
        return (2 <= self.n_distinct <= MAX_LABELS and self.n_distinct * 3 <= self.n - self.n_missing
                and self.longest <= MAX_LABEL_CHARS and not self.multiline)

    @property
    def texty(self) -> bool:
        """Sentences rather than codes or names: long, or mostly several words."""
        return self.kind == "string" and (self.p50 >= 40 or (self.p50 >= 15 and self.whitespace_share >= 0.5))


@dataclass
class SampleProfile:
    where: str
    n: int
    columns: dict[str, ColumnProfile]  # in the order the sample first names them

    def names(self) -> list[str]:
        return list(self.columns)


def _percentile(ordered: list[int], q: float) -> int:
    """Nearest-rank percentile of sorted values."""
    if not ordered:
        return 0
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def _is_chat(value: Any) -> bool:
    if isinstance(value, str) and value.lstrip().startswith("["):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return False
    return (isinstance(value, list) and bool(value)
            and all(isinstance(m, dict) and "role" in m and "content" in m for m in value))


def _is_number_text(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_time_text(text: str) -> bool:
    if len(text) < 8 or not ("-" in text or ":" in text) or not text[:1].isdigit():
        return False
    try:
        datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


def _kind(values: list[Any], declared: str | None) -> tuple[Kind, bool]:
    present = [v for v in values if v is not None and not (isinstance(v, str) and not v.strip())]
    if not present:
        return "empty", False
    if declared and any(t in declared.upper() for t in ("DATE", "TIME")):
        return "datetime", False
    head = present[:200]
    if all(isinstance(v, bool) for v in present):
        return "bool", False
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in present):
        return "number", all(isinstance(v, int) or float(v).is_integer() for v in present)
    if all(isinstance(v, datetime | date) for v in present):
        return "datetime", False
    if sum(_is_chat(v) for v in head) >= 0.9 * len(head):
        return "messages", False
    if any(isinstance(v, dict | list) for v in present):
        return "nested", False
    texts = [str(v).strip() for v in present]
    if all(_is_number_text(t) for t in texts):
        return "number", all(re.fullmatch(r"[+-]?\d+", t) is not None for t in texts)
    if sum(_is_time_text(t) for t in texts[:200]) >= 0.9 * min(len(texts), 200):
        return "datetime", False
    return "string", False


def profile_records(sample: Sample) -> SampleProfile:
    rows = sample.rows
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns = {}
    control = re.compile(CONTROL_CHARS)
    for name in names:
        raw = [row.get(name) for row in rows]
        kind, integer = _kind(raw, sample.column_types.get(name))
        texts = [as_text(v) for v in raw]
        present = [t for t in texts if t]
        lengths = sorted(len(t) for t in present)
        distinct: dict[str, int] = {}
        for t in present:
            distinct[t] = distinct.get(t, 0) + 1
        columns[name] = ColumnProfile(
            name=name, kind=kind, n=len(rows), n_missing=len(rows) - len(present), n_distinct=len(distinct),
            integer=integer, p50=_percentile(lengths, 0.5), p99=_percentile(lengths, 0.99),
            longest=lengths[-1] if lengths else 0,
            whitespace_share=sum(any(c.isspace() for c in t) for t in present) / len(present) if present else 0.0,
            multiline=any("\n" in t or "\r" in t for t in present),
            n_control=sum(control.search(t) is not None for t in present),
            counts=dict(sorted(distinct.items())) if len(distinct) <= MAX_LABELS else {})
    return SampleProfile(where=sample.where, n=len(rows), columns=columns)


# ---- proposals ----------------------------------------------------------------------------------------


@dataclass
class Choices:
    """What the user decided on the command line; None / empty: propose from the data."""

    id: str | None = None
    label: str | None = None
    text: list[str] = field(default_factory=list)
    answer: str | None = None
    task: Task | None = None
    watermark: str | None = None


@dataclass
class Proposal:
    task: Task
    id: str | None
    label: str | None
    text: list[str]
    answer: str | None
    messages: str | None = None
    watermark: str | None = None
    label_values: list[str] = field(default_factory=list)
    why: dict[str, str] = field(default_factory=dict)  # role -> what to check, for the config's comments

    def mapped(self) -> list[str]:
        """Every column the mapping reads (and so the suite may check)."""
        names = [self.id, *self.text, self.answer, self.label, self.messages]
        return list(dict.fromkeys(n for n in names if n))


def _formattable(name: str) -> bool:
    """A column a ``str.format`` template can name: ``{a.b}``, ``{a[0]}``, ``{a:b}`` would mean something else."""
    return bool(name) and not any(c in name for c in ".[]{}:!")


def _need_column(profile: SampleProfile, flag: str, name: str) -> None:
    if name not in profile.columns:
        raise TuneloopError(f"{flag} {name}: {profile.where} has no column {name!r} "
                            f"(columns: {', '.join(profile.names())})")


def _first(candidates: list[ColumnProfile], names: set[str]) -> ColumnProfile | None:
    """The first candidate whose name has one of ``names`` as a word, else the first candidate."""
    named = [c for c in candidates if set(name_tokens(c.name)) & names]
    return (named or candidates or [None])[0]


def _describe_values(col: ColumnProfile) -> str:
    return f"{col.n_distinct} values" if not col.counts else ", ".join(
        f"{v} ({k})" for v, k in sorted(col.counts.items(), key=lambda kv: -kv[1])[:12]) + (
        ", ..." if len(col.counts) > 12 else "")


def propose(profile: SampleProfile, choices: Choices) -> Proposal:
    """The id, label, text and answer fields and the task, from the sample unless ``choices`` says."""
    cols, where, n = profile.columns, profile.where, profile.n
    for flag, name in (("--id", choices.id), ("--label", choices.label), ("--answer", choices.answer),
                       ("--watermark", choices.watermark), *(("--text", t) for t in choices.text)):
        if name is not None:
            _need_column(profile, flag, name)
    for flag, name in (("--label", choices.label), ("--answer", choices.answer), *(("--text", t) for t in choices.text)):
        if name is not None and not _formattable(name):
            raise TuneloopError(f"{flag} {name}: a template cannot name a column whose name holds one of . : ! {{ }} or a square bracket; "
                                "rename the column in the source")
    why: dict[str, str] = {}

    # id: a column whose values are all present and distinct, an id-like name first
    if choices.id:
        id_ = choices.id
        col = cols[id_]
        dupes = col.n - col.n_missing - col.n_distinct
        why["id"] = (f"unique in all {n} sampled records" if col.unique else
                     f"{dupes} repeated and {col.n_missing} missing values in the sample: the gate quarantines "
                     "every repeat after the first and every missing one")
    else:
        ids = [c for c in cols.values() if c.unique and n >= 2 and c.longest <= 100 and (
            (c.kind == "number" and c.integer) or (c.kind == "string" and c.whitespace_share == 0))]
        named = [c for c in ids if c.name.lower() in ID_NAMES or name_tokens(c.name)[-1:] == ["id"]
                 or c.name.lower().endswith("id")]
        pick = (named or ids or [None])[0]
        id_ = pick.name if pick else None
        why["id"] = (f"unique in all {n} sampled records" + ("" if named else ", though its name does not say id")
                     if pick else "no column is unique in the sample: records are identified by file and line;"
                     " set mapping.id to a unique column if there is one")

    # timestamp: for a SQL source's watermark, and never a text field
    times = [c for c in cols.values() if c.kind == "datetime" and c.missing_share == 0]
    if choices.watermark:
        watermark = choices.watermark
    else:
        updated = [c for c in times if set(name_tokens(c.name)) & UPDATED_NAMES]
        watermark = (updated or [c for c in times if set(name_tokens(c.name)) & TIME_NAMES] or times or [None])[0]
        watermark = watermark.name if watermark else None
    taken = {id_, watermark}

    # a column holding chat messages replaces the templates
    chats = [c for c in cols.values() if c.kind == "messages" and c.name not in taken]
    messages = chats[0].name if chats and not choices.text and not choices.answer else None

    # label: a few distinct one-line values, each repeated
    label = choices.label
    if label:
        col = cols[label]
        if col.multiline:
            raise TuneloopError(f"--label {label}: some of its values in {where} span lines; a label is one line")
        if col.n_distinct > MAX_LABELS:  # its values are not kept for a suite's value set: say so, not fail later
            raise TuneloopError(f"--label {label}: {col.n_distinct} distinct values in {where}, more than the "
                                f"{MAX_LABELS} a label set may have here; pick a coarser field, or --task generation")
    elif choices.task != "generation" and not messages:
        labels = [c for c in cols.values() if c.name not in taken and c.categorical and c.missing_share <= MAX_MISSING
                  and _formattable(c.name) and (c.kind == "string" or (
                      c.kind in ("number", "bool") and set(name_tokens(c.name)) & LABEL_NAMES))]
        pick = _first(labels, LABEL_NAMES)
        label = pick.name if pick else None
        others = [c for c in labels if c is not pick]
        if pick:
            why["label"] = (f"{pick.n_distinct} labels: {_describe_values(pick)}"
                            + (f"; other candidates: {', '.join(f'{c.name} ({c.n_distinct} values)' for c in others)}"
                               if others else ""))
    task: Task = choices.task or ("classification" if label else "generation")
    if task == "classification" and not label:
        raise TuneloopError(f"{where}: no label field (a column with 2-{MAX_LABELS} distinct one-line values, each "
                            "repeated) for a classification task: pass --label COLUMN, or --task generation")
    if label:
        taken.add(label)
        col = cols[label]
        values = sorted(col.counts) if col.counts else []
    else:
        values = []

    # text fields: long or many-word strings, rarely missing; the answer among them by name
    texts = [c for c in cols.values() if c.name not in taken and c.texty and c.missing_share <= MAX_MISSING
             and _formattable(c.name)]
    answer = choices.answer
    if answer is None and not messages:
        named = [c for c in texts if set(name_tokens(c.name)) & ANSWER_NAMES and c.name not in choices.text]
        if named:
            answer = named[0].name
            why["answer"] = "its name says it is the answer"
        elif task == "generation" and len(texts) >= 2 and not choices.text:
            answer = texts[-1].name
            why["answer"] = ("the last text column (no column is named like answer, reply, response, output, "
                             "summary): make sure it is what the model should write")
    text = list(choices.text) or [c.name for c in texts if c.name != answer]
    if not messages and not text:
        strings = [f"{c.name} ({c.kind}{f', median {c.p50} chars' if c.kind == 'string' else ''})"
                   for c in cols.values() if c.name not in taken and c.name != answer]
        raise TuneloopError(f"{where}: no usable text field (a string column of sentences, present in at least "
                            f"{1 - MAX_MISSING:.0%} of records) among: {', '.join(strings) or 'no other columns'};"
                            " pass --text COLUMN")
    if task == "generation" and not messages and not answer:
        raise TuneloopError(f"{where}: no answer field for a generation task and no label field for a "
                            "classification task: pass --answer COLUMN or --label COLUMN")
    skipped = [c for c in cols.values() if c.kind == "string" and c.name not in taken and c.name not in text
               and c.name != answer and c.name != messages and c.texty and c.missing_share > MAX_MISSING]
    why["text"] = ", ".join(f"{name} (median {cols[name].p50} chars)" for name in text)
    if skipped:
        why["text"] += ("; left out, missing too often: "
                        + ", ".join(f"{c.name} ({c.missing_share:.0%} missing)" for c in skipped))
    return Proposal(task=task, id=id_, label=label, text=text, answer=answer, messages=messages,
                    watermark=watermark, label_values=values, why=why)


# ---- templates ----------------------------------------------------------------------------------------


def _title(name: str) -> str:
    return " ".join(name_tokens(name)).capitalize() or name


@dataclass
class Templates:
    system: str | None
    user: str | None
    assistant: str | None
    label_pattern: str | None  # classification: parses the label as the assistant template writes it


def templates_for(proposal: Proposal) -> Templates:
    """The user message is the text fields (titled when there are several); the assistant writes
    ``<label column>: <label>`` on its first line (classification), then the answer field if there is one."""
    if proposal.messages:
        return Templates(None, None, None, None)
    p = proposal
    user = f"{{{p.text[0]}}}" if len(p.text) == 1 else "\n\n".join(f"{_title(t)}: {{{t}}}" for t in p.text)
    inputs = " and ".join(_title(t).lower() for t in p.text)
    if p.task == "classification":
        assert p.label
        assistant = f"{p.label}: {{{p.label}}}" + (f"\n{{{p.answer}}}" if p.answer else "")
        # \A: the label is the answer's first line; the group runs from its first to its last visible character
        # on that line (labels may hold spaces), with or without re.MULTILINE
        pattern = r"\A\s*" + re.escape(p.label) + r":[ \t]*(\S(?:[^\n]*\S)?)"
        system = (f"Read the {inputs} and answer with the {_title(p.label).lower()} on the first line"
                  + (f", then write the {_title(p.answer).lower()}." if p.answer else "."))
    else:
        assert p.answer
        assistant, pattern = f"{{{p.answer}}}", None
        system = f"Read the {inputs} and write the {_title(p.answer).lower()}."
    return Templates(system=system, user=user, assistant=assistant, label_pattern=pattern)


# ---- the quality suite --------------------------------------------------------------------------------


def nice_ceil(value: float) -> int:
    """Rounded up to two significant digits: 1734 -> 1800, 87 -> 87, 9.2 -> 10."""
    if value <= 10:
        return max(1, math.ceil(value))
    step = 10 ** (int(math.log10(value)) - 1)
    return int(math.ceil(value / step) * step)


def length_bound(col: ColumnProfile) -> int:
    """Twice the sample's 99th percentile, rounded up: room for longer-than-usual values without letting
    through runaway ones (a pasted log, two records merged by a broken export). Unlike the longest value, the
    99th percentile is not set by the one outlier this check exists to catch."""
    return nice_ceil(max(2 * col.p99, 10))


def suite_for(profile: SampleProfile, proposal: Proposal, name: str = "records") -> dict[str, Any]:
    """A Great Expectations suite (the JSON of expectations/raw_records.json) for the mapped columns."""
    cols = profile.columns
    out: list[dict[str, Any]] = []

    def expect(kind: str, column: str, why: str | None = None, **kwargs: Any) -> None:
        entry: dict[str, Any] = {"type": kind, "kwargs": {"column": column, **kwargs}}
        if why:
            entry["meta"] = {"why": why}
        out.append(entry)

    p = proposal
    if p.id:
        expect("expect_column_values_to_not_be_null", p.id)
        expect("expect_column_values_to_be_unique", p.id, "the id identifies a record; a repeat is quarantined")
    for column in [*p.text, *([p.answer] if p.answer else [])]:
        col = cols[column]
        expect("expect_column_values_to_not_be_null", column)
        expect("expect_column_value_lengths_to_be_between", column,
               f"1 to 2x the sample's 99th percentile ({col.p99} chars), rounded up: room for longer-than-usual "
               f"values, and a stop for runaway ones (a pasted log, merged records); the sample's longest is "
               f"{col.longest}", min_value=1, max_value=length_bound(col))
        if col.n_control <= 0.01 * col.n:
            expect("expect_column_values_to_not_match_regex", column, "control characters and NUL bytes",
                   regex=CONTROL_CHARS)
    if p.label:
        expect("expect_column_values_to_not_be_null", p.label)
        expect("expect_column_values_to_be_in_set", p.label,
               f"the {len(p.label_values)} labels of the sample; add a new label here before records carry it",
               value_set=p.label_values)
    return {
        "name": name,
        "meta": {"notes": (
            f"Written by `tuneloop init` from {profile.where} ({profile.n} records) for the columns its mapping "
            "reads. Edit freely: each entry is a Great Expectations Core 1.x expectation. Rows failing any "
            "expectation go to quarantine with the expectation and column as the reason. "
            "expect_column_values_to_be_unique is enforced across the whole run (first record wins). "
            "PII is redacted by quality.pii before these checks.")},
        "expectations": out,
    }


# ---- the held-out split -------------------------------------------------------------------------------


def _fits(row: dict[str, Any], proposal: Proposal, bounds: dict[str, int]) -> bool:
    """A record the gate would accept on its own: every mapped field present, lengths within the suite's."""
    for column in proposal.mapped():
        text = as_text(row.get(column))
        if not text:
            return False
        if column in bounds and len(text) > bounds[column]:
            return False
    return not proposal.label or as_text(row.get(proposal.label)) in set(proposal.label_values)


def _allocate(sizes: dict[str, int], total: int) -> dict[str, int]:
    """``total`` split over groups in proportion to their size (largest remainders), each group of two or
    more records getting at least one while there are enough to go round, and none taking its last record."""
    n = sum(sizes.values())
    exact = {k: total * s / n for k, s in sizes.items()}
    share = {k: min(int(e), max(0, sizes[k] - 1)) for k, e in exact.items()}
    for k in sorted(sizes, key=lambda k: (-(exact[k] - int(exact[k])), k)):
        if sum(share.values()) >= total:
            break
        if share[k] < sizes[k] - 1:
            share[k] += 1
    for k in sorted(sizes, key=lambda k: -sizes[k]):  # a class missing from the held-out set is never scored
        if share[k] == 0 and sizes[k] >= 2:
            donor = max(share, key=lambda d: share[d])
            if share[donor] > 1:
                share[donor] -= 1
                share[k] = 1
    return share


@dataclass
class HoldoutSplit:
    rows: list[dict[str, Any]]
    n_eligible: int
    stratified_by: str | None
    per_label: dict[str, int]


def holdout_split(rows: list[dict[str, Any]], proposal: Proposal, suite: dict[str, Any], size: int,
                  seed: int = 0) -> HoldoutSplit:
    """``size`` records the gate would accept, drawn at random, in proportion to each label where there is one;
    kept in sample order."""
    bounds = {e["kwargs"]["column"]: e["kwargs"]["max_value"] for e in suite["expectations"]
              if e["type"] == "expect_column_value_lengths_to_be_between"}
    seen: set[str] = set()
    eligible: list[int] = []
    for i, row in enumerate(rows):
        if not _fits(row, proposal, bounds):
            continue
        key = as_text(row.get(proposal.id)) if proposal.id else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        eligible.append(i)
    rng = random.Random(seed)
    if proposal.label:
        groups: dict[str, list[int]] = {}
        for i in eligible:
            groups.setdefault(str(as_text(rows[i].get(proposal.label))), []).append(i)
        share = _allocate({k: len(v) for k, v in groups.items()}, size) if eligible else {}
        picked = sorted(i for k, members in groups.items() for i in rng.sample(members, share[k]))
        per_label = {k: share[k] for k in sorted(groups)}
    else:
        picked = sorted(rng.sample(eligible, min(size, len(eligible))))
        per_label = {}
    return HoldoutSplit(rows=[rows[i] for i in picked], n_eligible=len(eligible),
                        stratified_by=proposal.label, per_label=per_label)


def timestamp_text(value: Any) -> Any:
    """JSON for a held-out or corpus line: times as ISO text, other values as they are."""
    return value.isoformat() if isinstance(value, datetime | date) else value
