import json
import os
import shutil
import sqlite3
import time
from datetime import date, datetime
from decimal import Decimal

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import DEMO, DEMO_CONFIG, gate_folder, write_lines
from tuneloop.core.config import FolderSource, SqlSource, load_config
from tuneloop.core.records import DatasetVersion, TuneloopError
from tuneloop.core.scrub import redacted_url
from tuneloop.lib.ledger import Ledger, commit_ledger, consume, load_ledger
from tuneloop.lib.readers import read_chunks
from tuneloop.lib.sources import LandingFolder, SqlTable, look_back_from
from tuneloop.tasks.collect import describe

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
    assert q["NUL"] == ["expect_column_values_to_not_match_regex(body) [control-characters-and-nul-bytes]"]
    assert q["CTRL"] == ["expect_column_values_to_not_match_regex(subject)"]
    assert checked.n_accepted == 1 and checked.n_read == 4


def test_huge_csv_field_is_read_not_a_crash(tmp_path):
    write_lines(tmp_path / "a.csv", ["text", "y" * 10_000_000])
    rows, bad = read_all(folder(tmp_path).collect(Ledger()))
    assert len(rows[0][2]["text"]) == 10_000_000 and not bad


# ---- SQL source ---------------------------------------------------------------------------------------


def make_db(path, rows, mark_type="TEXT"):
    con = sqlite3.connect(path)
    con.execute(f"CREATE TABLE IF NOT EXISTS tickets (id INTEGER PRIMARY KEY, text TEXT, updated_at {mark_type})")
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
    assert SqlSource(url="sqlite://", table="t").lookback == 3600
    assert SqlSource(url="sqlite://", table="t", lookback="1h30m").lookback == 5400
    with pytest.raises(ValueError, match="'soon' is not a look-back"):
        SqlSource(url="sqlite://", table="t", lookback="soon")


# ---- SQL look-back: rows committed late or updated under the watermark, each collected exactly once -----


def sql_run(source, ledger, version):
    """One run as the retrain flow does it: collect, read, and consume only when something was new."""
    raw = source.collect(ledger)
    texts = [r["text"] for _, _, r in read_all(raw, source.config)[0]]
    return raw, texts, ledger if raw.nothing_new else consumed(ledger, raw, version)


@pytest.mark.parametrize("newest, late, lookback, mark_type", [
    ("2026-11-02T10:00:00", "2026-11-02T10:00:00", "1h", "TEXT"),  # equal to the watermark
    ("2026-11-02T10:00:00", "2026-11-02T09:30:00", "1h", "TEXT"),  # older, within the look-back
    ("2026-11-02T10:00:00Z", "2026-11-02T09:00:00Z", "1h", "TEXT"),  # at the look-back's very start
    ("2026-11-02 10:00:00.250", "2026-11-02 09:59:59.5", "15m", "TEXT"),  # space separator, fractions
    ("2026-11-02", "2026-11-01", "1h", "TEXT"),  # dates only: an hour back is the day before
    (1000, 1000, 0, "INTEGER"),  # a sequence, no look-back: rows at the watermark itself are still read again
    (1000, 995, 10, "INTEGER"),  # a sequence committed out of order
    (1_700_000_000.5, 1_699_999_000.0, "1h", "REAL"),  # epoch seconds: a duration counts as seconds
])
def test_a_row_committed_late_at_or_under_the_watermark_is_collected_once(tmp_path, newest, late, lookback, mark_type):
    db = tmp_path / "crm.db"
    oldest = "2000-01-01" if mark_type == "TEXT" else 1
    make_db(db, [(1, "first", oldest), (2, "second", newest)], mark_type)
    source = SqlTable(SqlSource(url=f"sqlite:///{db}", table="tickets", lookback=lookback))
    raw, texts, ledger = sql_run(source, Ledger(), "v1")
    assert texts == ["first", "second"]
    make_db(db, [(3, "late", late)], mark_type)  # committed after the run, under a watermark already stored
    raw, texts, ledger = sql_run(source, ledger, "v2")
    assert texts == ["late"] and raw.sql.n_rows == 1
    assert raw.sql.n_already_consumed == 1 and raw.sql.up_to == newest  # "second" read again, skipped
    raw, texts, _ = sql_run(source, ledger, "v3")
    assert raw.nothing_new and texts == []  # and not again


def test_a_late_row_older_than_the_look_back_is_outside_it(tmp_path):
    db = tmp_path / "crm.db"
    make_db(db, [(1, "first", "2026-11-02T10:00:00")])
    source = SqlTable(SqlSource(url=f"sqlite:///{db}", table="tickets", lookback="2h"))
    _, _, ledger = sql_run(source, Ledger(), "v1")
    make_db(db, [(2, "within", "2026-11-02T08:30:00"), (3, "beyond", "2026-11-02T07:59:59")])
    raw, texts, _ = sql_run(source, ledger, "v2")
    assert texts == ["within"] and raw.sql.reread_from == "2026-11-02T08:00:00"


def test_a_row_updated_under_the_watermark_is_collected_again_a_touched_one_is_not(tmp_path):
    db = tmp_path / "crm.db"
    make_db(db, [(1, "first", "2026-11-02T09:00:00"), (2, "second", "2026-11-02T10:00:00")])
    source = SqlTable(SqlSource(url=f"sqlite:///{db}", table="tickets"))
    _, _, ledger = sql_run(source, Ledger(), "v1")
    # same id, new content, timestamps within the window (one unchanged, one older than the watermark)
    make_db(db, [(1, "first, edited", "2026-11-02T09:20:00"), (2, "second, edited", "2026-11-02T10:00:00")])
    raw, texts, ledger = sql_run(source, ledger, "v2")
    assert texts == ["first, edited", "second, edited"] and raw.sql.n_already_consumed == 0
    make_db(db, [(1, "first, edited", "2026-11-02T09:40:00")])  # touched: a new timestamp, the same content
    raw, texts, _ = sql_run(source, ledger, "v3")
    assert raw.nothing_new and texts == [] and raw.sql.n_already_consumed == 2


def test_an_untouched_table_collects_nothing_on_reruns(tmp_path):
    db = tmp_path / "crm.db"
    make_db(db, [(i, f"row {i}", f"2026-11-02T{9 + i // 60:02d}:{i % 60:02d}:00") for i in range(90)])
    source = SqlTable(SqlSource(url=f"sqlite:///{db}", table="tickets", chunk_size=7))
    raw, texts, ledger = sql_run(source, Ledger(), "v1")
    assert len(texts) == 90
    for version in ("v2", "v3", "v4"):
        raw, texts, ledger = sql_run(source, ledger, version)
        # the last hour's 61 rows are read again and skipped: no new batch, so no new dataset version
        assert raw.nothing_new and texts == [] and ledger.dataset_version == "v1"
        assert raw.sql.n_reread == raw.sql.n_already_consumed == 61
    assert describe(raw) == (f"0 new or changed row(s) from sqlite:///{db} (tickets), 61 row(s) read again "
                             "within the look-back (from 2026-11-02T09:29:00): 61 already consumed (same id and "
                             "content), skipped")


def test_the_ledger_keeps_only_the_look_backs_rows_as_the_watermark_advances(tmp_path):
    db = tmp_path / "crm.db"
    source = SqlTable(SqlSource(url=f"sqlite:///{db}", table="tickets", lookback="1h"))
    ledger, total = Ledger(), 0
    for day in range(1, 11):  # each day 12 rows, one every 10 minutes from 08:00: the newest hour holds 7
        make_db(db, [(day * 100 + i, f"day {day} row {i}", f"2026-11-{day:02d}T{8 + i // 6:02d}:{i % 6 * 10:02d}:00")
                     for i in range(12)])
        raw, texts, ledger = sql_run(source, ledger, f"v{day}")
        total += len(texts)
        assert len(ledger.recent_rows[source.key]) == 7 and ledger.watermarks[source.key] == f"2026-11-{day:02d}T09:50:00"
    assert total == 120 and ledger.recent_rows.keys() == {source.key}
    commit_ledger(ledger, tmp_path / "consumed.json")
    assert load_ledger(tmp_path / "consumed.json").recent_rows == ledger.recent_rows


def test_a_ledger_from_before_look_backs_reads_its_window_again_once(tmp_path):
    db = tmp_path / "crm.db"
    make_db(db, [(1, "first", "2026-11-02T09:30:00"), (2, "second", "2026-11-02T10:00:00"),
                 (3, "late", "2026-11-02T10:00:00")])
    source = SqlTable(SqlSource(url=f"sqlite:///{db}", table="tickets"))
    legacy = Ledger(watermarks={source.key: "2026-11-02T10:00:00"})  # a watermark, no digests
    raw, texts, ledger = sql_run(source, legacy, "v2")
    assert texts == ["first", "second", "late"]  # nothing lost; rows already in the dataset the snapshot drops
    assert sql_run(source, ledger, "v3")[0].nothing_new


def test_look_back_bounds_round_down_in_the_watermarks_own_type():
    assert look_back_from(datetime(2026, 11, 2, 10, 0, 30), 3600) == datetime(2026, 11, 2, 9, 0, 30)
    assert look_back_from(date(2026, 11, 2), 1) == date(2026, 11, 1)
    assert look_back_from(100, 2.5) == 97 and look_back_from(Decimal("10.5"), 1) == Decimal("9.5")
    assert look_back_from("2026-11-02T10:00:00.75+02:00", 60) == "2026-11-02T09:59:00+02:00"
    assert look_back_from("2026-11-02 10:00", 90) == "2026-11-02 09:58"
    assert look_back_from("v17", 0) == "v17"
    with pytest.raises(TuneloopError, match="'v17' is neither a number nor an ISO date/time.*source.lookback: 0"):
        look_back_from("v17", 3600)


def test_sql_look_back_counts_reconcile_through_the_quality_gate(tmp_path):
    from tuneloop.lib.gate import check_batch

    tickets = [json.loads(line) for line in (DEMO / "tickets.jsonl").read_text().splitlines()[:40]]
    tickets.sort(key=lambda t: t["created_at"])
    columns = list(tickets[0])
    db = tmp_path / "crm.db"
    con = sqlite3.connect(db)
    con.execute(f"CREATE TABLE tickets ({', '.join(columns)})")

    def insert(rows):
        con.executemany(f"INSERT INTO tickets VALUES ({', '.join('?' * len(columns))})",
                        [[str(t[c]) for c in columns] for t in rows])
        con.commit()

    cfg = load_config(DEMO_CONFIG)
    config = SqlSource(url=f"sqlite:///{db}", table="tickets", watermark="created_at")
    source = SqlTable(config)
    insert(tickets[:30])
    raw = source.collect(Ledger())
    first = check_batch(raw, config, cfg.mapping, cfg.quality, tmp_path / "run1")
    assert first.n_read == raw.sql.n_rows == 30
    ledger = consumed(Ledger(), raw)
    newest = tickets[29]["created_at"]
    late = [{**t, "created_at": newest} for t in tickets[30:33]] + [{**tickets[0], "ticket_id": "LF-COPY",
                                                                    "created_at": newest}]
    insert(late)  # three late rows at the watermark, and a copy of an old ticket under a new id
    raw = source.collect(ledger)
    second = check_batch(raw, config, cfg.mapping, cfg.quality, tmp_path / "run2")
    assert raw.sql.n_rows == second.n_read == 4
    assert second.n_read == second.n_accepted + second.n_quarantined + second.n_duplicates
    assert raw.sql.n_already_consumed == raw.sql.n_reread - 4 > 0  # re-read, skipped, not in the gate's counts
