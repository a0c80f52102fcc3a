import json
import os
import shutil
import sqlite3
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DEMO, DEMO_CONFIG, gate_folder, write_lines
from tuneloop.core.config import FolderSource, SqlSource, load_config
from tuneloop.core.records import DatasetVersion, TuneloopError
from tuneloop.tasks.collect import LandingFolder, SqlTable, read_chunks, redacted_url
from tuneloop.tasks.ledger import Ledger, commit_ledger, consume, load_ledger

REQUIRED = ["text"]


def folder(path, **kw) -> LandingFolder:
    return LandingFolder(FolderSource(**kw), path, REQUIRED)


def read_all(raw, source=None):
    rows, bad = [], []
    for chunk in read_chunks(raw, source or FolderSource()):
        rows += list(zip(chunk.sources, chunk.lines, chunk.rows, strict=True))
        bad += chunk.unreadable
    return rows, bad


def consumed(ledger, raw, version="v1"):
    return consume(ledger, raw, DatasetVersion(version=version, path="x", n_examples=0))


# ---- which files are complete and new ---------------------------------------------------------------


def test_partial_hidden_and_unknown_files_are_not_collected(tmp_path):
    for name in ["a.jsonl", "b.csv", "c.jsonl.part", "d.csv.tmp", ".e.jsonl", "notes.txt"]:
        (tmp_path / name).write_text("", encoding="utf-8")
    raw = folder(tmp_path, patterns=["*"]).collect(Ledger())
    assert [os.path.basename(f.path) for f in raw.files] == ["a.jsonl", "b.csv"]
    assert any("c.jsonl.part: still being written" in s for s in raw.skipped)
    assert any("notes.txt: unknown format" in s for s in raw.skipped)


def test_recently_modified_files_wait_for_min_age(tmp_path):
    write_lines(tmp_path / "fresh.jsonl", ['{"text": "x"}'])
    old = write_lines(tmp_path / "old.jsonl", ['{"text": "y"}'])
    os.utime(old, (time.time() - 120, time.time() - 120))
    raw = folder(tmp_path, min_age_seconds=60).collect(Ledger())
    assert [os.path.basename(f.path) for f in raw.files] == ["old.jsonl"]
    assert "fresh.jsonl: modified" in raw.skipped[0]


def test_marker_files_gate_completeness_when_configured(tmp_path):
    write_lines(tmp_path / "a.jsonl", ['{"text": "x"}'])
    write_lines(tmp_path / "b.jsonl", ['{"text": "y"}'])
    (tmp_path / "b.jsonl.done").touch()
    raw = folder(tmp_path, marker_suffix=".done").collect(Ledger())
    assert [os.path.basename(f.path) for f in raw.files] == ["b.jsonl"]
    assert raw.skipped == ["a.jsonl: waiting for its marker a.jsonl.done"]


def test_a_file_is_consumed_once_by_content_renamed_or_touched_is_not_new_changed_is(tmp_path):
    path = write_lines(tmp_path / "a.jsonl", ['{"text": "x"}'])
    source = folder(tmp_path)
    first = source.collect(Ledger())
    assert len(first.files) == 1
    ledger = consumed(Ledger(), first)
    path.rename(tmp_path / "renamed.jsonl")
    os.utime(tmp_path / "renamed.jsonl")
    again = source.collect(ledger)
    assert again.nothing_new and again.already_consumed == 1
    write_lines(tmp_path / "renamed.jsonl", ['{"text": "x"}', '{"text": "more"}'])
    changed = source.collect(ledger)
    assert len(changed.files) == 1 and not changed.nothing_new


def test_uncommitted_consumption_is_read_again_and_the_ledger_is_written_atomically(tmp_path):
    write_lines(tmp_path / "land" / "a.jsonl", ['{"text": "x"}'])
    source = folder(tmp_path / "land")
    ledger_path = tmp_path / "state" / "consumed.json"
    raw = source.collect(load_ledger(ledger_path))
    # the run "crashes" before its snapshot: nothing was committed, so the same file is new again
    assert len(source.collect(load_ledger(ledger_path)).files) == 1
    commit_ledger(consumed(load_ledger(ledger_path), raw), ledger_path)
    assert source.collect(load_ledger(ledger_path)).nothing_new
    assert not list(ledger_path.parent.glob("*.tmp"))
    ledger_path.write_text("{not json")
    with pytest.raises(TuneloopError, match="consumption ledger .* is unreadable"):
        load_ledger(ledger_path)


def test_landing_files_are_never_modified_moved_or_deleted(tmp_path):
    shutil.copy(DEMO / "tickets.jsonl", tmp_path / "t.jsonl")
    before = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()}
    gate_folder(tmp_path, load_config(DEMO_CONFIG), tmp_path.parent / "run")
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in tmp_path.iterdir()} == before


def test_missing_landing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(TuneloopError, match="landing folder does not exist"):
        folder(tmp_path / "nowhere").collect(Ledger())


# ---- bad input: a quarantine entry with the reason, or a config error naming file and column ----------


def test_jsonl_lines_that_are_not_objects_are_rejected_with_their_line_number(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [
        '{"text": "hello"}', "", '{"text": "cut off', "[1, 2]", "42", '{"text": "bye"}'])
    rows, bad = read_all(folder(tmp_path).collect(Ledger()))
    assert [(line, row["text"]) for _, line, row in rows] == [(1, "hello"), (6, "bye")]
    assert all(src == str(path) for src, _, _ in rows)
    assert [(q.line, q.reasons[0]) for q in bad] == [
        (3, bad[0].reasons[0]), (4, "parse: expected a JSON object, got list"), (5, "parse: expected a JSON object, got int")]
    assert bad[0].reasons[0].startswith("parse: not valid JSON")


def test_partial_last_line_is_rejected_not_lost(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b'{"text": "a"}\n{"text": "b"}\n{"text": "c')
    rows, bad = read_all(folder(tmp_path).collect(Ledger()))
    assert len(rows) == 2 and [q.line for q in bad] == [3]


def test_non_utf8_bytes_reject_the_line_or_row_not_the_file(tmp_path):
    (tmp_path / "in.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    (tmp_path / "in.csv").write_bytes(b"text\nok\ncaf\xe9\n")
    rows, bad = read_all(folder(tmp_path).collect(Ledger()))
    assert sorted(r["text"] for _, _, r in rows) == ["ok", "ok"]
    assert sorted((os.path.basename(q.source), q.line, q.reasons[0]) for q in bad) == [
        ("in.csv", 3, "parse: not UTF-8"), ("in.jsonl", 2, "parse: not UTF-8")]


def test_csv_keeps_lines_handles_multiline_fields_and_rejects_malformed_rows(tmp_path):
    write_lines(tmp_path / "in.csv", ["id,text", "1,hello", '2,"multi', 'line"', "3", '4,"unterminated'])
    source = LandingFolder(FolderSource(), tmp_path, ["text"])
    rows, bad = read_all(source.collect(Ledger()))
    assert [(line, r) for _, line, r in rows] == [(2, {"id": "1", "text": "hello"}),
                                                  (3, {"id": "2", "text": "multi\nline"})]
    assert [(q.line, q.reasons[0].split(":")[0]) for q in bad] == [(5, "parse"), (6, "parse")]
    assert "1 fields, the header has 2" in bad[0].reasons[0]


def test_empty_and_zero_byte_files_yield_nothing_and_raise_nothing(tmp_path):
    (tmp_path / "zero.jsonl").write_bytes(b"")
    (tmp_path / "blank.jsonl").write_bytes(b"\n\n  \n")
    (tmp_path / "zero.csv").write_bytes(b"")
    (tmp_path / "header_only.csv").write_bytes(b"text\n")
    raw = folder(tmp_path).collect(Ledger())
    assert read_all(raw) == ([], [])


def test_missing_mapped_column_is_a_config_error_naming_file_and_column_before_any_work(tmp_path):
    write_lines(tmp_path / "a.csv", ["id,body", "1,hello"])
    with pytest.raises(TuneloopError, match=r"a\.csv: no column 'text' \(named in the mapping config\); columns in this file: id, body"):
        folder(tmp_path).collect(Ledger())
    (tmp_path / "a.csv").unlink()
    write_lines(tmp_path / "b.jsonl", ['{"id": 1, "body": "x"}'] * 3)
    with pytest.raises(TuneloopError, match=r"b\.jsonl: no column 'text'"):
        folder(tmp_path).collect(Ledger())
    (tmp_path / "b.jsonl").unlink()
    pq.write_table(pa.table({"id": [1], "body": ["x"]}), tmp_path / "c.parquet")
    with pytest.raises(TuneloopError, match=r"c\.parquet: no column 'text'"):
        folder(tmp_path).collect(Ledger())


def test_parquet_is_read_in_chunks_and_a_corrupt_file_is_quarantined_whole(tmp_path):
    pq.write_table(pa.table({"text": [f"row {i}" for i in range(25)], "n": list(range(25))}), tmp_path / "a.parquet")
    (tmp_path / "b.parquet").write_bytes(b"PAR1 this is not really parquet PAR1")
    raw = folder(tmp_path).collect(Ledger())
    assert [os.path.basename(f.path) for f in raw.files] == ["a.parquet"]
    assert raw.rejected[0].source.endswith("b.parquet") and raw.rejected[0].line == 0
    assert raw.rejected[0].reasons[0].startswith("parse: unreadable parquet file")
    chunks = list(read_chunks(raw, FolderSource(chunk_size=10)))
    assert [len(c) for c in chunks] == [1, 10, 10, 5]
    assert chunks[3].lines == [21, 22, 23, 24, 25] and chunks[3].rows[-1] == {"text": "row 24", "n": 24}
    ledger = consumed(Ledger(), raw)  # the corrupt file is accounted for; a fixed copy would be new
    assert folder(tmp_path).collect(ledger).nothing_new


def test_huge_fields_control_characters_and_numbers_reach_the_gate_and_end_in_quarantine(tmp_path):
    cfg = load_config(DEMO_CONFIG)
    base = json.loads((DEMO / "tickets.jsonl").read_text().splitlines()[0])
    rows = [
        {**base, "ticket_id": "HUGE", "body": "x" * 10_000_000},
        {**base, "ticket_id": "NUL", "body": "null byte \x00 here"},
        {**base, "ticket_id": "CTRL", "subject": "bell \x07 subject"},
        {**base, "ticket_id": 12345, "subject": 404},  # numbers where text is expected: read as text
    ]
    write_lines(tmp_path / "land" / "t.jsonl", [json.dumps(r) for r in rows])
    checked = gate_folder(tmp_path / "land", cfg, tmp_path / "run")
    q = {json.loads(line)["record"]["ticket_id"]: json.loads(line)["reasons"]
         for line in checked.quarantine_path.read_text().splitlines()}
    assert q["HUGE"] == ["expect_column_value_lengths_to_be_between(body)"]
    assert q["NUL"] == ["expect_column_values_to_not_match_regex(body)"]
    assert q["CTRL"] == ["expect_column_values_to_not_match_regex(subject)"]
    assert checked.n_accepted == 1 and checked.n_read == 4


def test_huge_csv_field_is_read_not_a_crash(tmp_path):
    write_lines(tmp_path / "a.csv", ["text", "y" * 10_000_000])
    rows, bad = read_all(folder(tmp_path).collect(Ledger()))
    assert len(rows[0][2]["text"]) == 10_000_000 and not bad


# ---- SQL source ---------------------------------------------------------------------------------------


def make_db(path, rows):
    con = sqlite3.connect(path)
    con.execute("CREATE TABLE IF NOT EXISTS tickets (id INTEGER PRIMARY KEY, text TEXT, updated_at TEXT)")
    con.executemany("INSERT OR REPLACE INTO tickets VALUES (?, ?, ?)", rows)
    con.commit()
    con.close()


def test_sql_table_is_read_incrementally_by_watermark(tmp_path):
    db = tmp_path / "crm.db"
    make_db(db, [(1, "first", "2026-11-01T10:00:00"), (2, "second", "2026-11-02T10:00:00")])
    config = SqlSource(url=f"sqlite:///{db}", table="tickets", chunk_size=1)
    source = SqlTable(config)
    raw = source.collect(Ledger())
    assert raw.sql.n_rows == 2 and raw.sql.up_to == "2026-11-02T10:00:00"
    rows, _ = read_all(raw, config)
    assert [r["text"] for _, _, r in rows] == ["first", "second"]
    assert rows[0][0] == f"sql:sqlite:///{db}/tickets" and [line for _, line, _ in rows] == [1, 2]
    ledger = consumed(Ledger(), raw)
    assert source.collect(ledger).nothing_new  # a rerun with nothing new reads nothing new
    make_db(db, [(2, "second, edited", "2026-11-03T09:00:00"), (3, "third", "2026-11-03T10:00:00")])
    raw2 = source.collect(ledger)
    assert raw2.sql.n_rows == 2
    assert [r["text"] for _, _, r in read_all(raw2, config)[0]] == ["second, edited", "third"]


def test_sql_query_source_and_password_never_shown(tmp_path, monkeypatch):
    db = tmp_path / "crm.db"
    make_db(db, [(1, "a", "2026-11-01"), (2, "b", "2026-11-02")])
    config = SqlSource(url=f"sqlite:///{db}", query="SELECT id, text, updated_at FROM tickets WHERE id > 1")
    raw = SqlTable(config).collect(Ledger())
    assert [r["text"] for _, _, r in read_all(raw, config)[0]] == ["b"]
    assert redacted_url("postgresql://svc:s3cret@db.internal/crm") == "postgresql://svc:***@db.internal/crm"
    monkeypatch.setenv("DB_PASSWORD", "s3cret")
    assert "s3cret" not in redacted_url("postgresql://svc:${DB_PASSWORD}@db.internal/crm")


def test_sql_errors_are_one_line_without_the_password(tmp_path):
    config = SqlSource(url=f"sqlite:///{tmp_path / 'missing' / 'x.db'}", table="tickets")
    with pytest.raises(TuneloopError, match=r"source sqlite:///.*OperationalError"):
        SqlTable(config).collect(Ledger())
    with pytest.raises(ValueError, match="exactly one of source.table and source.query"):
        SqlSource(url="sqlite://", table="t", query="SELECT 1")
