"""Reading a batch: the records of the files and SQL slices a source found new, in chunks, with lineage.

Separate from finding what is new (``lib/sources.py``) so the quality gate can stream a million records in
bounded memory. A line that cannot be parsed is not dropped: it becomes a quarantine entry with its reason;
so does a record nested too deep for the gate to write, or a file that vanished since it was found.
"""

from __future__ import annotations

import codecs
import csv
import io
from collections.abc import Iterator
from typing import Any

import orjson

from tuneloop.core.config import SourceConfig, SqlSource
from tuneloop.core.records import LandingFile, QuarantineEntry, RawBatch, RecordChunk, SqlSlice
from tuneloop.lib.sources import (
    row_digest,
    sql_engine,
    sql_from_json_value,
    sql_row_values,
    sql_rows_between,
    sql_selectable,
    unreadable_entry,
)

NESTING_LIMIT = 254  # orjson writes records again downstream and refuses deeper ones: quarantined at reading



def _too_deep(row: dict[str, Any], raw: bytes) -> bool:
    """Whether a record nests deeper than orjson writes (the gate writes each record again); a line with
    fewer brackets than the limit cannot, so the common case costs two byte counts."""
    if raw.count(b"[") + raw.count(b"{") <= NESTING_LIMIT:
        return False
    try:
        orjson.dumps(row, default=str)
    except orjson.JSONEncodeError:
        return True
    return False



def _read_jsonl(path: str, chunk_size: int) -> Iterator[RecordChunk]:
    chunk = RecordChunk()
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(codecs.BOM_UTF8):  # UTF-8 with a BOM is UTF-8
                raw = raw[len(codecs.BOM_UTF8):]
            if not raw.strip():
                continue
            try:
                row = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                reason = "not UTF-8" if "utf-8" in str(exc).lower() else f"not valid JSON ({exc})"
                chunk.unreadable.append(QuarantineEntry(
                    source=path, line=lineno, reasons=[f"parse: {reason}"],
                    record=raw.decode("utf-8", errors="replace").rstrip("\r\n")[:10_000]))
            else:
                why = (f"expected a JSON object, got {type(row).__name__}" if not isinstance(row, dict)
                       else f"nested deeper than {NESTING_LIMIT} levels" if _too_deep(row, raw) else None)
                if why is None:
                    chunk.add(row, path, lineno, raw)
                else:
                    chunk.unreadable.append(QuarantineEntry(
                        source=path, line=lineno, reasons=[f"parse: {why}"],
                        record=raw.decode("utf-8", errors="replace").rstrip("\r\n")[:10_000]))
            if len(chunk) >= chunk_size:
                yield chunk
                chunk = RecordChunk()
    if len(chunk):
        yield chunk



def _has_surrogates(values) -> bool:
    return any(isinstance(v, str) and any("\udc80" <= ch <= "\udcff" for ch in v) for v in values)



def _read_csv(path: str, chunk_size: int) -> Iterator[RecordChunk]:
    chunk = RecordChunk()
    with open(path, "rb") as raw_fh:
        # surrogateescape keeps undecodable bytes visible, so the row (not the file) is rejected
        fh = io.TextIOWrapper(raw_fh, encoding="utf-8-sig", errors="surrogateescape", newline="")
        reader = csv.reader(fh, strict=True)  # strict: an unterminated quote is an error, not a field
        header: list[str] | None = None
        start = 1
        while True:
            try:
                values = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                chunk.unreadable.append(QuarantineEntry(source=path, line=start, reasons=[f"parse: {exc}"], record=""))
                start = reader.line_num + 1
                continue
            line, start = start, reader.line_num + 1
            if header is None:
                header = values
                continue
            if not values:
                continue
            if len(values) != len(header):
                chunk.unreadable.append(QuarantineEntry(
                    source=path, line=line,
                    reasons=[f"parse: {len(values)} fields, the header has {len(header)}"],
                    record=",".join(values).encode("utf-8", "surrogateescape").decode("utf-8", "replace")[:10_000]))
            elif _has_surrogates(values):
                chunk.unreadable.append(QuarantineEntry(
                    source=path, line=line, reasons=["parse: not UTF-8"],
                    record=",".join(values).encode("utf-8", "surrogateescape").decode("utf-8", "replace")[:10_000]))
            else:
                chunk.add(dict(zip(header, values, strict=True)), path, line)
            if len(chunk) >= chunk_size:
                yield chunk
                chunk = RecordChunk()
    if len(chunk):
        yield chunk



def _read_parquet(path: str, chunk_size: int) -> Iterator[RecordChunk]:
    import pyarrow.parquet as pq

    line = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=chunk_size):
            chunk = RecordChunk()
            for row in batch.to_pylist():
                line += 1
                chunk.add(row, path, line)
            yield chunk
    except (FileNotFoundError, PermissionError):  # the file, not its data: read_chunks reports it
        raise
    except Exception as exc:  # a corrupt page: the rest of the file is one quarantine entry
        yield RecordChunk(unreadable=[QuarantineEntry(
            source=path, line=line + 1, reasons=[f"parse: corrupt Parquet data after row {line} ({exc})"],
            record="")])



def _read_sql(source: SqlSource, sql: SqlSlice, chunk_size: int) -> Iterator[RecordChunk]:
    """The look-back's rows not consumed yet, then the rows past the watermark: the two parts collect counted."""
    from sqlalchemy import literal_column, select

    src = sql_selectable(source)
    mark = src.c[source.watermark]
    after, up_to = sql_from_json_value(sql.after), sql_from_json_value(sql.up_to)
    label = f"sql:{sql.url}/{sql.selectable}"
    line = 0
    chunk = RecordChunk()
    with sql_engine(source).connect() as conn:
        if sql.reread_from is not None and sql.n_reread:
            known = set(sql.consumed)
            for row in sql_rows_between(conn, src, mark, sql_from_json_value(sql.reread_from), after, chunk_size):
                if known and row_digest(row, source.watermark) in known:
                    continue
                line += 1
                chunk.add(row, label, line)
                if len(chunk) >= chunk_size:
                    yield chunk
                    chunk = RecordChunk()
        query = select(literal_column("*")).select_from(src).where(
            *([mark > after] if after is not None else []), mark <= up_to).order_by(mark)
        result = conn.execution_options(stream_results=True, yield_per=chunk_size).execute(query).mappings()
        while rows := result.fetchmany(chunk_size):
            for row in rows:
                line += 1
                chunk.add(sql_row_values(row), label, line)
                if len(chunk) >= chunk_size:
                    yield chunk
                    chunk = RecordChunk()
    if len(chunk):
        yield chunk



READERS = {"jsonl": _read_jsonl, "csv": _read_csv, "parquet": _read_parquet}



def _read_file(f: LandingFile, chunk_size: int) -> Iterator[RecordChunk]:
    """One file's chunks. A file removed or locked since collect listed it ends as a quarantine entry (after
    the records already read), not as an error that stops the run."""
    n_read = 0
    try:
        for chunk in READERS[f.format](f.path, chunk_size):
            n_read += len(chunk)
            yield chunk
    except OSError as exc:
        yield RecordChunk(unreadable=[unreadable_entry(f.path, exc, after=n_read)])



def read_chunks(raw: RawBatch, source: SourceConfig, chunk_size: int | None = None) -> Iterator[RecordChunk]:
    """Every new record of the batch, chunk by chunk; whole-file rejections come first."""
    size = chunk_size or source.chunk_size
    if raw.rejected:
        yield RecordChunk(unreadable=list(raw.rejected))
    # Small files are read into shared chunks: each chunk costs the gate two suite runs (~0.3 s of Great
    # Expectations' fixed cost each), so a folder of a thousand small drops must not mean a thousand chunks.
    pending = RecordChunk()
    for f in raw.files:
        for chunk in _read_file(f, size):
            if not len(pending):
                pending = chunk
            else:
                pending.merge(chunk)
            if len(pending) >= size:
                yield pending
                pending = RecordChunk()
    if len(pending):
        yield pending
    if raw.sql is not None and raw.sql.n_rows and isinstance(source, SqlSource):
        yield from _read_sql(source, raw.sql, size)
