"""Profile a sample of records: what ``tuneloop init`` measures before it proposes a pipeline
(``app/proposal.py`` proposes from these measurements).

Plain functions, no Prefect and no Great Expectations. A sample (a JSONL, CSV or Parquet file, or rows of a
SQL table) is read and each column profiled: its kind, how often it is missing, its distinct values and
lengths. Values are read as the pipeline reads them (CSV: every value a string; JSONL: JSON types;
Parquet and SQL: their own types, SQL times as ISO text) and measured as the mapping sees them (strings
stripped, any other value as its text), so the suite's bounds and label set hold for what the gate checks.
"""

from __future__ import annotations

import csv
import math
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


# ---- templates ----------------------------------------------------------------------------------------


# ---- the quality suite --------------------------------------------------------------------------------


# ---- the held-out split -------------------------------------------------------------------------------


def timestamp_text(value: Any) -> Any:
    """JSON for a held-out or corpus line: times as ISO text, other values as they are."""
    return value.isoformat() if isinstance(value, datetime | date) else value
