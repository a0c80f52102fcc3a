"""`tuneloop init`: a starting pipeline for data that is not the demo's.

The datasets are generated here (fixed seed): product reviews with other field names and ten departments
(classification with a reply), and articles with summaries (generation, no low-cardinality column). What init
writes must load (config, suite), hold (the label pattern reads back every label) and pass `tuneloop check`
on the sample it came from; the refusals are one line and exit 2.
"""

from __future__ import annotations

import csv
import json
import random
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from conftest import ROOT

DEPARTMENTS = ["bath", "bedding", "cookware", "electronics", "garden", "home office", "kids", "outdoor",
               "pet supplies", "tools"]
ITEMS = {"bath": "towel set", "bedding": "duvet cover", "cookware": "frying pan", "electronics": "headphones",
         "garden": "hose reel", "home office": "desk lamp", "kids": "building blocks", "outdoor": "tent",
         "pet supplies": "cat tree", "tools": "cordless drill"}
MOODS = ["love", "like", "am disappointed by", "returned", "would recommend", "can't stop using"]
DETAILS = ["It arrived two days late but well packed.", "The colour is a little darker than in the photos.",
           "Setup took about ten minutes with the included instructions.", "Customer service answered quickly.",
           "After three weeks of daily use it still looks new.", "The price was fair for the quality."]


def reviews(n: int = 240, seed: int = 7) -> list[dict]:
    """Product reviews: review_id, title, review_text, department (10 labels), reply, created_at, rating."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        dept = DEPARTMENTS[i % len(DEPARTMENTS)]
        item = ITEMS[dept]
        mood = rng.choice(MOODS)
        body = f"I {mood} this {item}. " + " ".join(rng.sample(DETAILS, rng.randint(1, 4)))
        rows.append({
            "review_id": f"R{10_000 + i}",
            "title": f"{mood.capitalize()} the {item}" + rng.choice(["", "!", " - mostly"]),
            "review_text": body,
            "department": dept,
            "reply": f"Thank you for reviewing the {item}. We shared your notes with our {dept} team.",
            "created_at": f"2026-0{1 + i % 9}-{10 + i % 18}T{10 + i % 12}:00:00",
            "rating": rng.randint(1, 5),
        })
    return rows


def articles(n: int = 60, seed: int = 3) -> list[dict]:
    """Generation: every column unique or long; no label."""
    rng = random.Random(seed)
    words = ("the council approved a new budget for parks libraries roads schools after a long debate "
             "residents asked questions about taxes and the timeline for repairs").split()
    rows = []
    for i in range(n):
        body = " ".join(rng.choice(words) for _ in range(rng.randint(60, 120))).capitalize() + "."
        rows.append({"doc_id": 500 + i, "headline": f"Council meeting {i}: " + " ".join(rng.sample(words, 5)),
                     "article": body, "summary": " ".join(body.split()[:12]) + "."})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def init(*args: str):
    """`tuneloop init ...` in this process (typer's runner): exit code, stdout, stderr."""
    from tuneloop.app.cli import app

    result = CliRunner().invoke(app, ["init", *args])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, result.stderr


def check(sample: Path, config: Path | None, tmp_path: Path, extra_env: dict | None = None):
    """`tuneloop check` in a subprocess, as a user runs it."""
    env = {"TUNELOOP_HOME": str(tmp_path / "home"), "PATH": "", "DO_NOT_TRACK": "true",
           "GX_ANALYTICS_ENABLED": "false", **(extra_env or {})}
    args = [sys.executable, "-m", "tuneloop.app.cli", "check", str(sample), "--json"]
    if config is not None:
        args += ["--config", str(config)]
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=env, timeout=300)


def load_written(out: Path):
    from tuneloop.core.config import load_config
    from tuneloop.lib.gx import load_suite

    cfg = load_config(out / "tuneloop.yaml")
    suite, unique = load_suite(cfg.quality.suite, without="expect_column_values_to_be_unique")
    return cfg, suite, unique


def expectations(cfg) -> dict[tuple[str, str], dict]:
    data = json.loads(cfg.quality.suite.read_text())
    return {(e["type"], e["kwargs"]["column"]): e["kwargs"] for e in data["expectations"]}


def test_reviews_get_id_label_text_and_a_suite_for_their_columns_that_check_passes(tmp_path):
    sample = write_jsonl(tmp_path / "reviews.jsonl", reviews())
    out = tmp_path / "reviews-pipeline"
    code, stdout, stderr = init(str(sample), "--out", str(out))
    assert code == 0, stderr
    assert "review_id" in stdout and "department (10 labels)" in stdout

    cfg, suite, unique = load_written(out)
    m = cfg.mapping
    assert (m.id, m.label, cfg.evaluate.task) == ("review_id", "department", "classification")
    assert m.user == "Title: {title}\n\nReview text: {review_text}"
    assert m.assistant == "department: {department}\n{reply}"  # the reply field follows the label
    # the label set and the exact answer format, so a base model can answer zero-shot at all
    assert m.system == ("Read the title and review text and answer with the department on the first line, written "
                        "exactly as `department: <department>`, where it is one of: " + ", ".join(sorted(DEPARTMENTS))
                        + "; then write the reply.")
    assert cfg.quality.suite == (out / "expectations" / "records.json").resolve()
    assert cfg.evaluate.holdout == (out / "holdout.jsonl").resolve()
    assert cfg.source.kind == "folder" and cfg.source.landing == (out / "landing").resolve()
    assert cfg.train.base_model == "tiny" and cfg.train.tiny.corpus == [sample.resolve()]

    exp = expectations(cfg)
    assert exp[("expect_column_values_to_be_in_set", "department")]["value_set"] == sorted(DEPARTMENTS)
    assert [e["kwargs"]["column"] for e in unique] == ["review_id"]
    longest = max(len(r["review_text"]) for r in reviews())
    bound = exp[("expect_column_value_lengths_to_be_between", "review_text")]
    assert bound["min_value"] == 1 and longest <= bound["max_value"] <= 3 * longest
    suite_columns = {e.configuration.kwargs["column"] for e in suite.expectations}
    assert suite_columns <= {"review_id", "title", "review_text", "department", "reply"}  # what the mapping reads
    assert {"created_at", "rating"}.isdisjoint(suite_columns)

    # the label pattern reads every label back as the assistant template writes it (labels with spaces too)
    pattern = re.compile(cfg.evaluate.label_pattern, re.MULTILINE)
    for r in reviews():
        written = m.assistant.format(**r)
        assert pattern.search(written).group(1) == r["department"], written
        assert re.compile(cfg.evaluate.label_pattern).search(written).group(1) == r["department"]

    # the held-out file: records in the sample's own format, ten per cent, every department in it
    held = [json.loads(line) for line in (out / "holdout.jsonl").read_text().splitlines()]
    assert len(held) == 24 and {h["department"] for h in held} == set(DEPARTMENTS)
    assert all(h in reviews() for h in held)
    from tuneloop.lib.heldout import read_heldout

    assert [h.label for h in read_heldout(cfg.evaluate.holdout, m)] == [h["department"] for h in held]

    text = (out / "tuneloop.yaml").read_text()
    assert text.count("# check:") >= 5
    values = [line.split("#")[0] for line in text.splitlines() if not line.lstrip().startswith("#")]
    assert str(tmp_path) not in "\n".join(values)  # relative paths only (comments repeat the command line)
    assert yaml.safe_load(text)["train"]["tiny"]["corpus"] == ["../reviews.jsonl"]

    passed = check(sample, out / "tuneloop.yaml", tmp_path)
    assert passed.returncode == 0, passed.stdout + passed.stderr
    report = json.loads(passed.stdout.strip().splitlines()[-1])
    assert report["passed"] and report["accepted"] == 240 and report["quarantined"] == 0
    assert "config:" not in passed.stderr  # --config given: nothing to say

    # the bundled (demo) suite does not fit this data, and without --config the command says which config it used
    demo = check(sample, None, tmp_path)
    assert demo.returncode == 2 and "no column 'subject'" in demo.stderr
    assert "(the packaged demo config: pass --config, or run tuneloop init)" in demo.stderr
    assert "config: " in demo.stderr.splitlines()[0]


def test_a_planted_bad_record_in_the_next_batch_is_caught_by_the_written_suite(tmp_path):
    """The suite is not decoration: an unknown department, a runaway text and a repeated id are quarantined."""
    rows = reviews()
    sample = write_csv(tmp_path / "reviews.csv", rows)  # CSV: every value a string, as the landing folder reads it
    out = tmp_path / "p"
    assert init(str(sample), "--out", str(out))[0] == 0
    cfg, _, _ = load_written(out)
    assert cfg.source.patterns == ["*.csv"] and cfg.mapping.id == "review_id"
    bad = [dict(rows[0], review_id="N1", department="groceries"),
           dict(rows[1], review_id="N2", review_text="log line " * 400),
           dict(rows[5], title="Another title")]  # the id of rows[5] again, other content
    batch = write_csv(tmp_path / "batch.csv", rows[3:40] + bad)  # header on line 1: bad ones on lines 39-41
    out_check = check(batch, out / "tuneloop.yaml", tmp_path)
    report = json.loads(out_check.stdout.strip().splitlines()[-1])
    reasons = {r["line"]: r["reasons"] for r in report["rejected"]}
    assert reasons == {39: ["expect_column_values_to_be_in_set(department)"],
                       40: ["expect_column_value_lengths_to_be_between(review_text)"],
                       41: ["expect_column_values_to_be_unique(review_id)"]}, report["rejected"]


def test_articles_without_a_label_get_a_generation_task(tmp_path):
    sample = write_jsonl(tmp_path / "articles.jsonl", articles())
    out = tmp_path / "news"
    code, stdout, stderr = init(str(sample), "--out", str(out), "--holdout", "10")
    assert code == 0, stderr
    cfg, _, unique = load_written(out)
    assert cfg.evaluate.task == "generation" and cfg.evaluate.primary_metric == "rouge_l"
    assert cfg.mapping.label is None and cfg.mapping.id == "doc_id"
    assert cfg.mapping.assistant == "{summary}"  # named like an answer
    assert cfg.mapping.user == "Headline: {headline}\n\nArticle: {article}"
    assert len((out / "holdout.jsonl").read_text().splitlines()) == 10
    assert "label_pattern" not in (out / "tuneloop.yaml").read_text()
    # --task classification without a label column is refused; forcing a label makes it classification
    code, _, stderr = init(str(sample), "--out", str(tmp_path / "x"), "--task", "classification")
    assert code == 2 and "no label field" in stderr


def test_overrides_win_over_the_proposals(tmp_path):
    sample = write_jsonl(tmp_path / "reviews.jsonl", reviews())
    out = tmp_path / "o"
    code, _, stderr = init(str(sample), "--out", str(out), "--label", "rating", "--text", "review_text",
                           "--answer", "reply", "--holdout", "0.2", "--name", "Ratings Model")
    assert code == 0, stderr
    cfg, _, _ = load_written(out)
    assert cfg.mapping.label == "rating" and cfg.mapping.user == "{review_text}"
    assert cfg.mapping.assistant == "rating: {rating}\n{reply}" and cfg.registry.model_name == "ratings-model"
    assert expectations(cfg)[("expect_column_values_to_be_in_set", "rating")]["value_set"] == ["1", "2", "3", "4", "5"]
    assert len((out / "holdout.jsonl").read_text().splitlines()) == 48
    code, _, stderr = init(str(sample), "--out", str(tmp_path / "g"), "--task", "generation")
    cfg, _, _ = load_written(tmp_path / "g")
    assert code == 0 and cfg.evaluate.task == "generation" and cfg.mapping.label is None
    assert cfg.mapping.assistant == "{reply}"


def one_line_refusal(result: tuple[int, str, str], *needles: str) -> None:
    code, _, stderr = result
    assert code == 2, stderr
    assert len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("error: ") and "Traceback" not in stderr
    for needle in needles:
        assert needle in stderr, stderr


def test_refusals_are_one_line_and_exit_2(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    one_line_refusal(init(str(empty), "--out", str(tmp_path / "a")), str(empty), "no records")

    codes = write_jsonl(tmp_path / "codes.jsonl", [{"sku": f"A{i}", "qty": i, "kind": "x" if i % 2 else "y"}
                                                  for i in range(30)])
    one_line_refusal(init(str(codes), "--out", str(tmp_path / "b")), str(codes), "no usable text field",
                     "--text")

    sample = write_jsonl(tmp_path / "reviews.jsonl", reviews())
    one_line_refusal(init(str(sample), "--out", str(tmp_path / "c"), "--label", "dept"),
                     "--label dept", "no column 'dept'", "department")
    one_line_refusal(init(str(sample), "--out", str(tmp_path / "c"), "--text", "body"), "no column 'body'")
    one_line_refusal(init(str(sample), "--out", str(tmp_path / "c"), "--label", "review_text"),
                     "--label review_text", "distinct values", "more than the 50")

    out = tmp_path / "taken"
    assert init(str(sample), "--out", str(out))[0] == 0
    before = (out / "tuneloop.yaml").read_text()
    one_line_refusal(init(str(sample), "--out", str(out), "--label", "rating"),
                     str(out / "tuneloop.yaml"), "already exists", "--force")
    assert (out / "tuneloop.yaml").read_text() == before  # nothing overwritten
    code, _, stderr = init(str(sample), "--out", str(out), "--label", "rating", "--force")
    assert code == 0 and "label: rating" in (out / "tuneloop.yaml").read_text()

    one_line_refusal(init(str(tmp_path / "missing.csv"), "--out", str(tmp_path / "d")), "no such file")
    one_line_refusal(init(str(sample), "--out", str(tmp_path / "e"), "--holdout", "0.9"), "at most half")
    assert not (tmp_path / "a").exists() and not (tmp_path / "e" / "tuneloop.yaml").exists()


def test_sql_table_gets_a_sql_source_with_a_watermark_and_no_password(tmp_path, monkeypatch):
    db = tmp_path / "shop.db"
    rows = reviews(120)
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE reviews (review_id TEXT PRIMARY KEY, title TEXT, review_text TEXT, "
                     "department TEXT, reply TEXT, created_at TEXT, updated_at TIMESTAMP, rating INTEGER)")
        conn.executemany("INSERT INTO reviews VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                         [(r["review_id"], r["title"], r["review_text"], r["department"], r["reply"],
                           r["created_at"], r["created_at"].replace("T", " "), r["rating"]) for r in rows])
    out = tmp_path / "sqlpipe"
    monkeypatch.chdir(tmp_path)
    code, stdout, stderr = init("--sql-url", "sqlite:///shop.db", "--table", "reviews", "--out", str(out))
    assert code == 0, stderr
    cfg, _, _ = load_written(out)
    assert cfg.source.kind == "sql" and cfg.source.table == "reviews" and cfg.source.watermark == "updated_at"
    assert cfg.source.url == f"sqlite:///{db}"  # a relative SQLite path made absolute: runs start anywhere
    assert (cfg.mapping.id, cfg.mapping.label, cfg.evaluate.task) == ("review_id", "department", "classification")
    assert cfg.train.tiny.corpus == [(out / "sample.jsonl").resolve()]
    assert len((out / "sample.jsonl").read_text().splitlines()) == 120

    passed = check(out / "sample.jsonl", None, tmp_path, {"TUNELOOP_CONFIG": str(out / "tuneloop.yaml")})
    assert passed.returncode == 0, passed.stdout + passed.stderr
    assert f"config: {out / 'tuneloop.yaml'} (from $TUNELOOP_CONFIG)" in passed.stderr
    assert json.loads(passed.stdout.strip().splitlines()[-1])["accepted"] == 120

    # a password never reaches the file: the URL reads it from an environment variable
    from tuneloop.app.init import config_url

    url, note = config_url("postgresql+psycopg://bob:s3cr%40t@db.example.com:5432/shop", "SHOP_DB_PASSWORD")
    assert url == "postgresql+psycopg://bob:${SHOP_DB_PASSWORD}@db.example.com:5432/shop"
    assert "s3cr" not in url and "SHOP_DB_PASSWORD" in note
    import os

    monkeypatch.setenv("SHOP_DB_PASSWORD", "s3cr%40t")
    from sqlalchemy.engine import make_url

    assert make_url(os.path.expandvars(url)).password == "s3cr@t"  # what the SQL source connects with
    # a password next to a variable host, or in the query string, is not written either; a reference stays
    for given in ("postgresql://app:secret@${DB_HOST}/shop", "postgresql://app@db/shop?password=secret"):
        written, _ = config_url(given, "SHOP_DB_PASSWORD")
        assert "secret" not in written and ":${SHOP_DB_PASSWORD}@" in written, written
    assert config_url("postgresql://app:${PW}@db/shop", "X") == ("postgresql://app:${PW}@db/shop", None)
    assert config_url("sqlite:///lite.db", "X")[0] == f"sqlite:///{Path('lite.db').resolve()}"

    # without a timestamp column there is nothing to take new rows by
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE plain AS SELECT review_id, title, review_text, department FROM reviews")
    one_line_refusal(init("--sql-url", f"sqlite:///{db}", "--table", "plain", "--out", str(tmp_path / "p2")),
                     "no timestamp column", "--watermark")
    one_line_refusal(init("--sql-url", f"sqlite:///{db}", "--table", "nope", "--out", str(tmp_path / "p3")),
                     "--table nope", "no such table", "reviews")
    written = yaml.safe_load((out / "tuneloop.yaml").read_text())
    assert written["source"]["url"] == f"sqlite:///{db}"


@pytest.mark.parametrize("name", ["parquet"])
def test_a_parquet_sample_is_profiled_and_its_text_becomes_the_corpus(tmp_path, name):
    import pyarrow as pa
    import pyarrow.parquet as pq

    sample = tmp_path / "reviews.parquet"
    pq.write_table(pa.Table.from_pylist(reviews(60)), sample)
    out = tmp_path / "pq"
    code, _, stderr = init(str(sample), "--out", str(out))
    assert code == 0, stderr
    cfg, _, _ = load_written(out)
    assert cfg.source.patterns == ["*.parquet"] and cfg.mapping.label == "department"
    assert cfg.train.tiny.corpus == [(out / "sample.jsonl").resolve()]
