"""Sources: find what is new in a source; stream its records, in chunks, with their lineage (the collect
stage asks a source what is new; the quality gate and the drift monitor read its records).

Two sources, each a small class whose one method, ``collect(ledger)``, says what is new:
- ``LandingFolder``: complete JSONL / CSV / Parquet files whose content hash is not in the ledger (a
  renamed or touched file is not new, a changed one is). Files are never modified, moved or deleted.
- ``SqlTable``: rows of a table or query past the ledger's watermark, up to the newest at collect time,
  plus rows within ``lookback`` before it that were not consumed yet (committed late, or updated).

Reading is separate (``read_chunks``, in ``lib/readers.py``) so the quality stage can stream a million records in bounded
memory. A line that cannot be parsed is not dropped: it becomes a quarantine entry with its reason.

The landing folder is a boundary: a symlink leading out of it, or a symlink loop, is refused before
anything of its target is opened (a quarantine entry naming the link, never the target's content). Bad
input never stops a run: a file that vanishes or cannot be opened, a record nested too deep for the gate
to write, each is a quarantine entry with its reason, and the rest of the batch goes on.
"""

from __future__ import annotations

import codecs
import csv
import errno
import hashlib
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping
from datetime import date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import orjson

from tuneloop.core.config import FolderSource, SourceConfig, SqlSource
from tuneloop.core.records import LandingFile, QuarantineEntry, RawBatch, SqlSlice, TuneloopError
from tuneloop.core.scrub import redacted_url
from tuneloop.core.state import sha256_file
from tuneloop.lib.ledger import Ledger

INCOMPLETE_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload")
FORMATS = {".jsonl": "jsonl", ".json": "jsonl", ".ndjson": "jsonl", ".csv": "csv", ".parquet": "parquet",
           ".pq": "parquet"}
SNIFF_RECORDS = 100  # a JSONL field absent from all of a file's first records is a mapping error
csv.field_size_limit(sys.maxsize)  # a 10 MB field is a quality problem (quarantine), not a crash


def _unreadable_reason(exc: OSError) -> str:
    """Why a listed file could not be read; never its content (nor the path: the entry's source names it)."""
    if isinstance(exc, FileNotFoundError):
        return "unreadable: the file vanished between listing and reading"
    if isinstance(exc, PermissionError):
        return "unreadable: permission denied"
    return f"unreadable: {type(exc).__name__} ({exc.strerror or 'I/O error'})"


def unreadable_entry(path: str, exc: OSError, after: int = 0) -> QuarantineEntry:
    """A whole file that could not be read: no content hash, so the ledger does not take it as consumed and
    it is collected once readable."""
    reason = _unreadable_reason(exc) + (f" after {after} record(s); the rest was not read" if after else "")
    return QuarantineEntry(source=path, line=0, reasons=[reason], record={})


def boundary_refusal(path: Path, landing: Path) -> tuple[str, str] | None:
    """(reason, key) when ``path`` (found in ``landing``) leads out of the landing folder, through a symlink
    to it or to a folder on its way, or is a symlink loop; None when it stays inside.

    Only links are followed (lstat and readlink): nothing of a target is opened. The key hashes the link's
    name and where it points, so that the ledger can take the refusal as consumed and a link pointed
    elsewhere is refused again.
    """
    try:
        real = os.path.realpath(path, strict=True)
        code, why = None, ""
    except FileNotFoundError:  # dangling: refused only when it would lead outside
        real = os.path.realpath(path)
        code, why = None, ""
    except OSError as exc:
        if exc.errno != errno.ELOOP:
            raise
        real = os.path.realpath(path)
        code, why = "symlink_loop", "the link never resolves to a file"
    if code is None and not Path(real).is_relative_to(os.path.realpath(landing)):
        code, why = "symlink_outside_landing", "the link resolves outside the landing folder"
    if code is None:
        return None
    name = path.relative_to(landing)
    key = hashlib.sha256(f"{code}\0{name}\0{real}".encode("utf-8", "surrogateescape")).hexdigest()
    return f"refused: {code} ({why}; not read)", key


def _missing_columns_error(path: Path, missing: list[str], seen: list[str]) -> TuneloopError:
    return TuneloopError(
        f"{path}: no column {', '.join(repr(m) for m in missing)} (named in the mapping config);"
        f" columns in this file: {', '.join(seen) or 'none'}"
    )


def check_columns(path: Path, fmt: str, required: list[str]) -> None:
    """Fail before any work when a file lacks a column the mapping needs (a config error, not bad rows)."""
    if not required or path.stat().st_size == 0:
        return
    if fmt == "csv":
        with path.open("r", encoding="utf-8-sig", errors="replace", newline="") as fh:
            header = next(csv.reader(fh), [])
        missing = [c for c in required if c not in header]
        if missing:
            raise _missing_columns_error(path, missing, header)
    elif fmt == "parquet":
        import pyarrow.parquet as pq

        names = pq.ParquetFile(path).schema_arrow.names
        missing = [c for c in required if c not in names]
        if missing:
            raise _missing_columns_error(path, missing, names)
    else:
        seen: dict[str, None] = {}
        parsed = 0
        with path.open("rb") as fh:
            for lineno, raw in enumerate(fh, start=1):
                try:
                    row = orjson.loads(raw[len(codecs.BOM_UTF8):] if lineno == 1 and raw.startswith(codecs.BOM_UTF8)
                                       else raw)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(row, dict):
                    seen.update(dict.fromkeys(row))
                    parsed += 1
                    if parsed >= SNIFF_RECORDS:
                        break
        missing = [c for c in required if c not in seen]
        if parsed and missing:
            raise _missing_columns_error(path, missing, list(seen))


class LandingFolder:
    """Complete files of a landing folder that no earlier dataset version consumed."""

    def __init__(self, config: FolderSource, landing: Path, required: list[str]):
        self.config, self.landing, self.required = config, landing, required

    def _complete(self, path: Path, now: float) -> str | None:
        """None when the file is complete, else why it is not (yet)."""
        if path.name.endswith(INCOMPLETE_SUFFIXES):
            return f"{path.name}: still being written (temporary suffix)"
        age = now - path.stat().st_mtime
        if age < self.config.min_age_seconds:
            return f"{path.name}: modified {age:.0f}s ago (source.min_age_seconds is {self.config.min_age_seconds:g})"
        marker = self.config.marker_suffix
        if marker and not path.with_name(path.name + marker).exists():
            return f"{path.name}: waiting for its marker {path.name + marker}"
        return None

    def collect(self, ledger: Ledger) -> RawBatch:
        if not self.landing.is_dir():
            raise TuneloopError(f"landing folder does not exist: {self.landing}")
        now = time.time()
        candidates = sorted(  # symlinks too, even dangling or looping ones: each is checked, never skipped unsaid
            {p for pattern in self.config.patterns for p in self.landing.glob(pattern)
             if (p.is_symlink() or p.is_file()) and not p.name.startswith(".")},
            key=lambda p: p.name,
        )
        batch = RawBatch()
        for path in candidates:
            try:
                self._examine(path, now, ledger, batch)
            except OSError as exc:  # listed, then removed or locked: reported, and collected once readable
                batch.rejected.append(unreadable_entry(str(path), exc))
        return batch

    def _examine(self, path: Path, now: float, ledger: Ledger, batch: RawBatch) -> None:
        """Put one listed path in its place in the batch: refused, skipped, already consumed, rejected or new.

        The boundary comes first: a link out of the landing folder is refused before anything of it is read.
        An OSError (the file vanished or is locked) is left to the caller."""
        if (refusal := boundary_refusal(path, self.landing)) is not None:
            reason, key = refusal
            if key in ledger.files:
                batch.already_consumed += 1
            else:  # taken as consumed once accounted for in quarantine, like a corrupt file
                batch.rejected.append(QuarantineEntry(source=str(path), line=0, reasons=[reason],
                                                      record={"sha256": key, "size": 0}))
            return
        if path.is_symlink() and not path.exists():
            batch.skipped.append(f"{path.name}: a symlink to a file that does not exist (yet)")
            return
        if path.is_dir():  # a link to a folder inside: its files are matched by the patterns, or not
            return
        if (why := self._complete(path, now)) is not None:
            batch.skipped.append(why)
            return
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            batch.skipped.append(f"{path.name}: unknown format (known: {', '.join(sorted(FORMATS))})")
            return
        digest, size = sha256_file(path), path.stat().st_size
        if digest in ledger.files:
            batch.already_consumed += 1
            return
        try:
            check_columns(path, fmt, self.required)
        except (TuneloopError, FileNotFoundError, PermissionError):
            raise
        except Exception as exc:  # a corrupt Parquet footer, for one: the whole file is quarantined
            batch.rejected.append(QuarantineEntry(
                source=str(path), line=0, reasons=[f"parse: unreadable {fmt} file ({type(exc).__name__}: {exc})"],
                record={"sha256": digest, "size": size}))
            return
        batch.files.append(LandingFile(path=str(path), sha256=digest, size=size, format=fmt))


def sql_engine(source: SqlSource):
    from sqlalchemy import create_engine

    source.require_driver()  # a missing driver is one line naming what to install, not an ImportError's traceback
    return create_engine(os.path.expandvars(source.url))


def sql_selectable(source: SqlSource):
    from sqlalchemy import column, table, text

    if source.table:
        return table(source.table, column(source.watermark)).alias("src")
    return text(source.query).columns(column(source.watermark)).subquery("src")


def sql_to_json_value(value: Any) -> Any:
    if isinstance(value, datetime | date):
        return {"type": "datetime" if isinstance(value, datetime) else "date", "value": value.isoformat()}
    return value


def sql_from_json_value(value: Any) -> Any:
    if isinstance(value, dict) and value.get("type") == "datetime":
        return datetime.fromisoformat(value["value"])
    if isinstance(value, dict) and value.get("type") == "date":
        return date.fromisoformat(value["value"])
    return value


def _iso_look_back(text: str, seconds: float) -> str:
    """An ISO date/time text ``seconds`` earlier, rounded down and written in the same shape (separator,
    precision, zone), so that the database's text comparison orders it correctly against the column."""
    shaped = len(text) >= 10 and text[4] == "-" and text[7] == "-" and (len(text) == 10 or text[10] in "T ")
    try:
        if not shaped:
            raise ValueError(text)
        if len(text) == 10:
            return look_back_from(date.fromisoformat(text), seconds).isoformat()
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise TuneloopError(f"watermark value {text!r} is neither a number nor an ISO date/time, so source.lookback "
                            "cannot count back from it: set source.lookback: 0 (rows at the watermark itself are "
                            "still read again)") from None
    has_seconds = len(text) > 16 and text[16] == ":"
    earlier = (moment - timedelta(seconds=seconds)).replace(microsecond=0, **({} if has_seconds else {"second": 0}))
    out = earlier.isoformat(sep=text[10], timespec="seconds" if has_seconds else "minutes")
    return out[:-6] + "Z" if text.endswith("Z") and out.endswith("+00:00") else out


def look_back_from(mark: Any, seconds: float) -> Any:
    """The lower bound of the look-back: ``seconds`` before ``mark`` for dates and times, that many units
    before it for numbers; rounded down, so that a row within the look-back is never left out."""
    if seconds == 0 or mark is None:
        return mark
    if isinstance(mark, bool):
        raise TuneloopError("a boolean watermark column cannot be counted back from: set source.lookback: 0")
    if isinstance(mark, int):
        return mark - math.ceil(seconds)
    if isinstance(mark, float):
        return mark - seconds
    if isinstance(mark, Decimal):
        return mark - Decimal(seconds)
    if isinstance(mark, datetime):
        return mark - timedelta(seconds=seconds)
    if isinstance(mark, date):
        return (datetime.combine(mark, datetime.min.time()) - timedelta(seconds=seconds)).date()
    if isinstance(mark, str):
        return _iso_look_back(mark, seconds)
    raise TuneloopError(f"watermark value of type {type(mark).__name__} cannot be counted back from: "
                        "set source.lookback: 0")


def sql_row_values(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row as the pipeline sees it: dates and times as ISO text."""
    return {k: v.isoformat() if isinstance(v, datetime | date) else v for k, v in row.items()}


def row_digest(row: Mapping[str, Any], watermark: str) -> str:
    """A row's id and content, without its watermark: a row only touched is not new, an edited one is."""
    content = {k: v for k, v in row.items() if k != watermark}
    return hashlib.sha256(orjson.dumps(content, option=orjson.OPT_SORT_KEYS | orjson.OPT_NON_STR_KEYS,
                                       default=str)).hexdigest()[:16]


def sql_rows_between(conn, src, mark, low: Any, high: Any, chunk_size: int) -> Iterator[dict[str, Any]]:
    from sqlalchemy import literal_column, select

    where = ([mark >= low] if low is not None else []) + [mark <= high]
    query = select(literal_column("*")).select_from(src).where(*where).order_by(mark)
    result = conn.execution_options(stream_results=True, yield_per=chunk_size).execute(query).mappings()
    while rows := result.fetchmany(chunk_size):
        yield from (sql_row_values(row) for row in rows)


class SqlTable:
    """Rows of a table or query newer than the last watermark this source was consumed up to, and rows
    within the look-back before it whose id and content were not consumed yet.

    The ledger keeps the digests of the rows within the look-back of its watermark (one window, replaced
    each run). A ledger written before look-backs has none: its window is read again once, and rows already
    in the dataset are then dropped by the snapshot as already present.
    """

    def __init__(self, config: SqlSource):
        self.config = config

    @property
    def key(self) -> str:
        what = self.config.table or self.config.query or ""
        return hashlib.sha256(f"{redacted_url(self.config.url)}|{what}|{self.config.watermark}".encode()).hexdigest()[:16]

    def collect(self, ledger: Ledger) -> RawBatch:
        from sqlalchemy import func, select
        from sqlalchemy.exc import SQLAlchemyError

        src = sql_selectable(self.config)
        mark, name, size = src.c[self.config.watermark], self.config.watermark, self.config.chunk_size
        after = sql_from_json_value(ledger.watermarks.get(self.key))
        since = look_back_from(after, self.config.lookback)
        consumed = ledger.recent_rows.get(self.key, [])
        known = set(consumed)
        n_reread = n_known = 0
        window = None
        try:
            with sql_engine(self.config).connect() as conn:
                where = [mark > after] if after is not None else []
                n_new, newest = conn.execute(select(func.count(), func.max(mark)).select_from(src).where(*where)).one()
                if after is not None:
                    for row in sql_rows_between(conn, src, mark, since, after, size):
                        n_reread += 1
                        n_known += row_digest(row, name) in known
                up_to = newest if n_new else after
                if n_new or n_reread > n_known:  # the ledger will move: what it must keep from now on
                    window = sorted({row_digest(row, name) for row in sql_rows_between(
                        conn, src, mark, look_back_from(up_to, self.config.lookback), up_to, size)})
        except SQLAlchemyError as exc:
            raise TuneloopError(f"source {redacted_url(self.config.url)}: {type(exc).__name__}: "
                                f"{str(exc.orig if hasattr(exc, 'orig') and exc.orig else exc).splitlines()[0]}") from None
        return RawBatch(sql=SqlSlice(
            source_key=self.key, url=redacted_url(self.config.url),
            selectable=self.config.table or self.config.query or "", watermark=name,
            after=sql_to_json_value(after), up_to=sql_to_json_value(up_to) if n_new else ledger.watermarks.get(self.key),
            n_rows=int(n_new) + n_reread - n_known, reread_from=sql_to_json_value(since) if after is not None else None,
            consumed=consumed if n_reread else [], n_reread=n_reread, n_already_consumed=n_known, window=window))


def make_source(config: SourceConfig, landing: Path, required: list[str]) -> LandingFolder | SqlTable:
    return LandingFolder(config, landing, required) if isinstance(config, FolderSource) else SqlTable(config)


# ---- reading, in chunks -------------------------------------------------------------------------------


