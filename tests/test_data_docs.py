"""Data Docs agree with ``tuneloop check`` (issue 16): every expectation the CLI reports, the same outcome and
count, and failing rows named by the file and line the quarantine names. They work with no network (issue 19)."""

import html
import json
import re
import subprocess
import sys
from pathlib import Path

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

    # one per expectation, as the CLI reports them (each with its own key): the same outcome and count, in order
    docs_view = [(r["expectation_config"]["type"], r["expectation_config"]["kwargs"]["column"], r["success"],
                  r["result"]["unexpected_count"]) for r in results["results"]]
    cli_raw = [o for o in report["expectations"] if o["suite"] == "raw_records"]
    assert [(o["expectation"], o["column"], o["success"], o["unexpected_count"]) for o in cli_raw] == docs_view
    assert len({o["key"] for o in cli_raw}) == len(suite["expectations"])

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


ASSET_REF = re.compile(r'<(?:script|img)\b[^>]*?\bsrc="([^"]+)"|<link\b[^>]*?\bhref="([^"]+)"|url\([\'"]?([^\'")]+)')


def asset_refs(text: str) -> list[str]:
    """Scripts, style sheets, icons, images and fonts a page or style sheet loads (not the links a person follows)."""
    head, _, body = text.partition("</head>")
    # in the body only tags GX writes count: values from the data are escaped, so no raw tag of theirs matches
    return [a or b or c for a, b, c in ASSET_REF.findall(head)] + [a for a, _, _ in ASSET_REF.findall(body) if a]


def test_data_docs_work_offline_from_their_own_folder(tmp_path, monkeypatch):
    """Issue 19, air-gapped: GX's pages fetched jQuery, Bootstrap, Font Awesome and bootstrap-table from CDNs, so
    the index linked no result and status icons were blank. Every asset is now a file of the site, by relative path
    (the folder works once logged to MLflow and downloaded), and the index links each result in its HTML. The run
    has a name (``--out .`` made it ``__none__``); a long value is cut in what the pages show, whole in quarantine;
    markup in the data is shown as text, not run."""
    cfg = load_config(DEMO_CONFIG, ["quality.min_examples=1"])
    records = [json.loads(line) for line in (DEMO / "tickets.jsonl").read_text(encoding="utf-8").splitlines()[:6]]
    records[1]["body"] = "x" * 2500
    records[2]["body"] = "<b>bold</b> and a bell \x07"
    write_lines(tmp_path / "landing" / "t <img src=x>.jsonl", [json.dumps(r) for r in records])  # whoever drops files names them
    monkeypatch.chdir(tmp_path)
    checked = gate_folder(tmp_path / "landing", cfg, Path("."))  # a run folder with no name of its own
    docs = checked.data_docs.parent

    pages = sorted(docs.rglob("*.html"))
    validation_pages = sorted(docs.glob("validations/*/*/*/*.html"))
    assert len(validation_pages) == 2 and len(pages) == 5  # index, two suites, two results
    styles, loaded = set(), set()
    for page in pages:
        for ref in asset_refs(page.read_text(encoding="utf-8")):
            assert not re.match(r"(https?:)?//", ref), f"{page.relative_to(docs)} loads {ref} from the network"
            path = (page.parent / ref.split("?")[0]).resolve()
            assert path.is_file() and path.is_relative_to(docs.resolve()), f"{page.relative_to(docs)}: {ref} is missing"
            loaded.add(path.relative_to(docs.resolve()).as_posix())
            styles |= {path} if path.suffix == ".css" else set()
    for style in styles:  # the fonts the style sheets load are there too
        for ref in asset_refs(style.read_text(encoding="utf-8")):
            assert ref.startswith("data:") or (style.parent / ref.split("?")[0]).is_file(), f"{style.name}: {ref}"
    assert {"static/vendor/bootstrap4/css/bootstrap.min.css", "static/vendor/bootstrap4/jquery.min.js",
            "static/vendor/bootstrap4/js/bootstrap.min.js", "static/vendor/fontawesome/css/solid.min.css",
            "static/images/logo-long.png"} <= loaded
    assert (docs / "static/vendor/fontawesome/webfonts/fa-solid-900.woff2").stat().st_size > 50_000

    # the index links every result in its HTML, not through JavaScript from a CDN
    index = (docs / "index.html").read_text(encoding="utf-8")
    linked = set(re.findall(r'<a href="(validations/[^"]+)"', index))
    assert linked == {p.relative_to(docs).as_posix() for p in validation_pages}
    assert "bootstrapTable" not in index

    results = json.loads((docs / "raw_records.validation.json").read_text())
    assert results["meta"]["run_id"]["run_name"] == tmp_path.name
    assert all("__none__" not in p.read_text(encoding="utf-8") for p in pages)

    page = next(p for p in validation_pages if "raw_records" in p.parts).read_text(encoding="utf-8")
    failed = {r["expectation_config"]["type"]: r["result"] for r in results["results"] if not r["success"]}
    shown = "x" * 199 + "\u2026"
    assert failed["expect_column_value_lengths_to_be_between"]["unexpected_list"] == [shown]
    assert failed["expect_column_value_lengths_to_be_between"]["unexpected_index_list"][0]["body"] == shown
    assert shown in page and "x" * 200 not in page
    assert "&lt;b&gt;bold&lt;/b&gt;" in page and "<b>bold" not in page
    assert all("<img src=x>" not in p.read_text(encoding="utf-8") for p in pages)  # a file name is text too
    quarantined = {q["line"]: q for q in map(json.loads, checked.quarantine_path.read_text().splitlines())}
    assert quarantined[2]["record"]["body"] == "x" * 2500
    assert quarantined[3]["reasons"] == [
        "expect_column_values_to_not_match_regex(body) [control-characters-and-nul-bytes]"]
