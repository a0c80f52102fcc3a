"""Data Docs agree with ``tuneloop check`` (issue 16): every expectation the CLI reports, the same outcome and
count, and failing rows named by the file and line the quarantine names."""

import html
import json
import re
import subprocess
import sys

from conftest import DEMO, DEMO_CONFIG, ROOT, gate_folder, write_lines
from tuneloop.core.config import load_config

DUPLICATE_LINE, EMPTY_BODY_LINE = 9, 7


def test_data_docs_show_every_expectation_the_cli_reports_with_the_quarantines_line_numbers(tmp_path):
    records = [json.loads(line) for line in (DEMO / "tickets.jsonl").read_text(encoding="utf-8").splitlines()[:12]]
    records[DUPLICATE_LINE - 1] = {**records[DUPLICATE_LINE - 1], "ticket_id": records[1]["ticket_id"]}  # id of line 2
    records[EMPTY_BODY_LINE - 1]["body"] = ""
    path = write_lines(tmp_path / "export.jsonl", [json.dumps(r) for r in records])
    out = tmp_path / "out"
    # chunks of 5 lines: the duplicate is in another chunk than its first occurrence, and the result is merged
    cli = subprocess.run([sys.executable, "-m", "tuneloop.app.cli", "check", str(path), "--json", "--out", str(out),
                          "--set", "source.chunk_size=5"], cwd=ROOT, capture_output=True, text=True,
                         env={"TUNELOOP_HOME": str(tmp_path / "home"), "PATH": ""})
    assert cli.returncode == 1, cli.stderr
    report = json.loads(cli.stdout)
    assert {r["line"]: r["reasons"] for r in report["rejected"]} == {
        EMPTY_BODY_LINE: ["expect_column_value_lengths_to_be_between(body)"],
        DUPLICATE_LINE: ["expect_column_values_to_be_unique(ticket_id)"]}

    docs = out / "data_docs"
    results = json.loads((docs / "raw_records.validation.json").read_text())
    suite = json.loads((ROOT / "expectations" / "raw_records.json").read_text())
    assert sorted((r["expectation_config"]["type"], r["expectation_config"]["kwargs"]["column"]) for r in results["results"]) \
        == sorted((e["type"], e["kwargs"]["column"]) for e in suite["expectations"])  # uniqueness included
    assert results["success"] is False
    assert results["statistics"]["evaluated_expectations"] == len(suite["expectations"])
    assert results["statistics"]["unsuccessful_expectations"] == 2
    assert results["meta"]["batch_markers"] == {"rows": 12, "chunks": 3}

    # per (expectation, column), as the CLI reports them: the same outcome and count
    docs_view: dict[tuple, list] = {}
    for r in results["results"]:
        key = ("raw_records", r["expectation_config"]["type"], r["expectation_config"]["kwargs"]["column"])
        outcome = docs_view.setdefault(key, [True, 0])
        outcome[0] &= r["success"]
        outcome[1] += r["result"]["unexpected_count"]
    cli_view = {(o["suite"], o["expectation"], o["column"]): [o["success"], o["unexpected_count"]]
                for o in report["expectations"] if o["suite"] == "raw_records"}
    assert cli_view == docs_view

    # the rows named in Data Docs are the quarantine's lines
    failed = {r["expectation_config"]["type"]: r["result"] for r in results["results"] if not r["success"]}
    assert failed["expect_column_values_to_be_unique"]["unexpected_index_list"] == [
        {"file": str(path), "line": DUPLICATE_LINE, "ticket_id": records[1]["ticket_id"]}]
    assert failed["expect_column_values_to_be_unique"]["element_count"] == 12
    assert failed["expect_column_value_lengths_to_be_between"]["unexpected_index_list"] == [
        {"file": str(path), "line": EMPTY_BODY_LINE, "body": ""}]

    # and the page a person opens says so
    page, = (docs / "validations" / "raw_records").rglob("*.html")
    text = " ".join(html.unescape(re.sub(r"<[^>]+>", " ", re.sub(r"<(script|style).*?</\1>", "", page.read_text(), flags=re.S))).split())
    assert "Status: Failed" in text and "Unsuccessful Expectations 2" in text
    assert f"values must be unique. 1 unexpected values found. ≈8.333% of 12 total rows. Unexpected Value Count file line " \
           f"{records[1]['ticket_id']} 1 {path} {DUPLICATE_LINE}" in text
    assert f"EMPTY 1 {path} {EMPTY_BODY_LINE}" in text
    assert "_row" not in text


def test_records_with_their_own_line_and_file_fields_keep_them_and_data_docs_use_other_names(tmp_path):
    """A mapped field called ``line`` is the data's: the gate's lineage columns step aside (``_line``)."""
    cfg = load_config(DEMO_CONFIG, ["mapping.metadata=[line, file]", "quality.min_examples=1"])
    records = [json.loads(line) for line in (DEMO / "tickets.jsonl").read_text(encoding="utf-8").splitlines()[:4]]
    records = [{**r, "line": "not a number", "file": "theirs"} for r in records]
    records[2]["queue"] = "nowhere"
    write_lines(tmp_path / "landing" / "t.jsonl", [json.dumps(r) for r in records])
    checked = gate_folder(tmp_path / "landing", cfg, tmp_path / "run")
    quarantined = [json.loads(line) for line in checked.quarantine_path.read_text().splitlines()]
    assert [(q["line"], q["reasons"]) for q in quarantined] == [(3, ["expect_column_values_to_be_in_set(queue)"])]
    results = json.loads((checked.data_docs.parent / "raw_records.validation.json").read_text())
    in_set, = (r["result"] for r in results["results"] if not r["success"])
    assert in_set["unexpected_index_column_names"] == ["_file", "_line"]
    assert in_set["unexpected_index_list"] == [{"_file": quarantined[0]["source"], "_line": 3, "queue": "nowhere"}]
