"""Collect: read the records in the landing folder, keeping where each one came from.

A line that cannot be parsed is not dropped: it becomes an ``unreadable`` quarantine entry naming the
file, the line and what is wrong, and the quality stage counts it with the rest.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import orjson
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.config import SourceConfig
from tasks.records import QuarantineEntry, RawBatch, Record, TuneloopError

# Files being written are not complete: writers use these suffixes and rename when done.
INCOMPLETE_SUFFIXES = (".part", ".tmp", ".partial", ".crdownload")


def landing_files(landing: Path, patterns: list[str]) -> list[Path]:
    """Complete files matching the patterns, in a stable order (name), hidden and partial files skipped."""
    if not landing.is_dir():
        raise TuneloopError(f"landing folder does not exist: {landing}")
    found = {p for pattern in patterns for p in landing.glob(pattern) if p.is_file()}
    return sorted(
        (p for p in found if not p.name.startswith(".") and not p.name.endswith(INCOMPLETE_SUFFIXES)),
        key=lambda p: p.name,
    )


def read_jsonl(path: Path) -> tuple[list[Record], list[QuarantineEntry]]:
    records: list[Record] = []
    bad: list[QuarantineEntry] = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if not raw.strip():
                continue
            try:
                row = orjson.loads(raw)
            except orjson.JSONDecodeError as exc:
                reason = "not UTF-8" if "utf-8" in str(exc).lower() else f"not valid JSON ({exc})"
                bad.append(QuarantineEntry(source=str(path), line=lineno, reasons=[f"parse: {reason}"],
                                           record=raw.decode("utf-8", errors="replace").rstrip("\n")))
                continue
            if not isinstance(row, dict):
                bad.append(QuarantineEntry(source=str(path), line=lineno,
                                           reasons=[f"parse: expected a JSON object, got {type(row).__name__}"],
                                           record=raw.decode("utf-8", errors="replace").rstrip("\n")))
                continue
            records.append(Record(source=str(path), line=lineno, fields=row))
    return records, bad


def read_csv(path: Path) -> tuple[list[Record], list[QuarantineEntry]]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise TuneloopError(f"{path}: not UTF-8 (byte {exc.start})") from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    records: list[Record] = []
    bad: list[QuarantineEntry] = []
    for row in reader:
        lineno = reader.line_num
        if None in row or any(v is None for v in row.values()):
            bad.append(QuarantineEntry(source=str(path), line=lineno,
                                       reasons=["parse: wrong number of columns"], record=dict(row)))
            continue
        records.append(Record(source=str(path), line=lineno, fields=dict(row)))
    return records, bad


READERS = {".jsonl": read_jsonl, ".json": read_jsonl, ".csv": read_csv}


def collect_landing(source: SourceConfig, landing: Path) -> RawBatch:
    """Read every complete file of the landing folder. Files are never modified, moved or deleted."""
    files = landing_files(landing, source.patterns)
    if not files:
        raise TuneloopError(f"nothing to collect: no complete file matching {', '.join(source.patterns)}"
                            f" in the landing folder {landing}")
    records: list[Record] = []
    unreadable: list[QuarantineEntry] = []
    for path in files:
        reader = READERS.get(path.suffix.lower())
        if reader is None:
            raise TuneloopError(f"{path}: no reader for {path.suffix!r} files (known: {', '.join(READERS)})")
        got, bad = reader(path)
        records.extend(got)
        unreadable.extend(bad)
    return RawBatch(files=[str(p) for p in files], records=records, unreadable=unreadable)


@task(name="collect", cache_policy=NO_CACHE)
def collect_task(source: SourceConfig, landing: Path) -> RawBatch:
    batch = collect_landing(source, landing)
    get_run_logger().info(f"collect: {batch.n_read} records from {len(batch.files)} file(s) in {landing}"
          f" ({len(batch.unreadable)} unreadable)")
    return batch
