import os
import time

import pytest

from conftest import write_lines
from flows.config import SourceConfig
from tasks.collect import collect_landing, landing_files
from tasks.records import TuneloopError


def test_partial_hidden_and_unmatched_files_are_not_collected(tmp_path):
    for name in ["a.jsonl", "b.csv", "c.jsonl.part", "d.jsonl.tmp", ".e.jsonl", "notes.txt"]:
        (tmp_path / name).write_text("", encoding="utf-8")
    assert [p.name for p in landing_files(tmp_path, ["*.jsonl", "*.csv"])] == ["a.jsonl", "b.csv"]


def test_jsonl_keeps_lineage_and_rejects_unparsable_lines_with_their_line_number(tmp_path):
    path = write_lines(tmp_path / "in.jsonl", [
        '{"id": "1", "text": "hello"}',
        "",
        '{"id": "2", "text": "cut off',
        "[1, 2]",
        '{"id": "3", "text": "bye"}',
    ])
    batch = collect_landing(SourceConfig(), tmp_path)
    assert [(r.line, r.fields["id"]) for r in batch.records] == [(1, "1"), (5, "3")]
    assert all(r.source == str(path) for r in batch.records)
    assert [(q.line, q.reasons[0].split(":")[0]) for q in batch.unreadable] == [(3, "parse"), (4, "parse")]
    assert "not valid JSON" in batch.unreadable[0].reasons[0]
    assert "expected a JSON object, got list" in batch.unreadable[1].reasons[0]
    assert batch.n_read == 4  # the blank line is not a record


def test_csv_rows_keep_their_line_and_a_short_row_is_rejected(tmp_path):
    write_lines(tmp_path / "in.csv", ["id,text", "1,hello", '2,"multi', 'line"', "3"])
    batch = collect_landing(SourceConfig(), tmp_path)
    assert [(r.line, r.fields) for r in batch.records] == [(2, {"id": "1", "text": "hello"}),
                                                            (4, {"id": "2", "text": "multi\nline"})]
    assert [(q.line, q.reasons) for q in batch.unreadable] == [(5, ["parse: wrong number of columns"])]


def test_files_are_read_in_name_order_and_left_untouched(tmp_path):
    write_lines(tmp_path / "b.jsonl", ['{"id": "b"}'])
    write_lines(tmp_path / "a.jsonl", ['{"id": "a"}'])
    before = {p.name: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in tmp_path.iterdir()}
    time.sleep(0.01)
    batch = collect_landing(SourceConfig(), tmp_path)
    assert [r.fields["id"] for r in batch.records] == ["a", "b"]
    assert {p.name: (p.read_bytes(), os.stat(p).st_mtime_ns) for p in tmp_path.iterdir()} == before


def test_missing_landing_folder_is_a_clear_error(tmp_path):
    with pytest.raises(TuneloopError, match="landing folder does not exist"):
        collect_landing(SourceConfig(), tmp_path / "nowhere")


def test_empty_landing_folder_says_so(tmp_path):
    (tmp_path / "half.jsonl.part").write_text("{}")
    with pytest.raises(TuneloopError, match=r"nothing to collect: no complete file matching \*\.jsonl, \*\.csv"):
        collect_landing(SourceConfig(), tmp_path)
