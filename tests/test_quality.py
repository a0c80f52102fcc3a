import json

import orjson
import pytest

from conftest import DEMO, DEMO_CONFIG, write_lines
from flows.config import load_config
from tasks.collect import collect_landing
from tasks.quality import QualityGateFailed, check_batch, enforce_gate, redact_pii
from tasks.records import TuneloopError


@pytest.fixture(scope="module")
def demo_raw(tmp_path_factory):
    landing = tmp_path_factory.mktemp("landing")
    (landing / "tickets.jsonl").write_bytes((DEMO / "tickets.jsonl").read_bytes())
    return collect_landing(load_config(DEMO_CONFIG).source, landing)


def quarantine_by_id(checked):
    rows = [orjson.loads(line) for line in checked.quarantine_path.read_bytes().splitlines()]
    return {(r["record"].get("ticket_id") if isinstance(r["record"], dict) else f"line {r['line']}"): r for r in rows}


def test_every_planted_bad_record_ends_in_its_place_and_counts_reconcile(demo_raw, tmp_path):
    cfg = load_config(DEMO_CONFIG)
    checked = check_batch(demo_raw, cfg.mapping, cfg.quality, tmp_path)
    assert checked.n_read == checked.n_accepted + checked.n_quarantined + checked.n_duplicates == 2407
    q = quarantine_by_id(checked)
    assert q["LF-900001"]["reasons"] == ["expect_column_value_lengths_to_be_between(body)"]  # empty body
    assert q["LF-900002"]["reasons"] == ["expect_column_value_lengths_to_be_between(body)"]  # overlong body
    assert q["LF-900005"]["reasons"] == ["expect_column_values_to_be_in_set(queue)"]  # unknown queue
    assert q["line 1801"]["reasons"][0].startswith("parse: not valid JSON")  # truncated line
    assert len(q) == checked.n_quarantined == 4
    dups = [json.loads(line) for line in checked.duplicates_path.read_text().splitlines()]
    assert dups == [{"source": dups[0]["source"], "line": 1501, "duplicate_of": {"source": dups[0]["source"], "line": 41}}]
    accepted = {e.record_id: e for e in checked.accepted}
    assert "[EMAIL]" in accepted["LF-900003"].messages[1]["content"]
    assert "@" not in accepted["LF-900003"].messages[1]["content"]
    assert "[PHONE]" in accepted["LF-900004"].messages[1]["content"]
    assert checked.n_redacted == 2
    example = accepted["LF-100000"]
    assert [m["role"] for m in example.messages] == ["system", "user", "assistant"]
    assert example.messages[2]["content"].startswith("queue: sync\n")
    assert example.label == "sync" and example.line == 1 and example.source.endswith("tickets.jsonl")
    enforce_gate(checked, cfg.quality)  # 4 of 2407 is under the demo's 5%


def test_pii_policy_quarantine_sends_pii_records_to_quarantine_with_the_pattern_as_reason(demo_raw, tmp_path):
    cfg = load_config(DEMO_CONFIG, ["quality.pii=quarantine"])
    checked = check_batch(demo_raw, cfg.mapping, cfg.quality, tmp_path)
    q = quarantine_by_id(checked)
    assert q["LF-900003"]["reasons"] == ["expect_column_values_to_not_match_regex(body)"]
    assert q["LF-900004"]["reasons"] == ["expect_column_values_to_not_match_regex(body)"]
    assert checked.n_redacted == 0
    assert checked.n_read == checked.n_accepted + checked.n_quarantined + checked.n_duplicates


def test_gate_fails_with_a_clear_message_when_too_much_is_quarantined(demo_raw, tmp_path):
    cfg = load_config(DEMO_CONFIG, ["quality.max_quarantine_fraction=0.001"])
    checked = check_batch(demo_raw, cfg.mapping, cfg.quality, tmp_path)
    with pytest.raises(QualityGateFailed, match=r"4 of 2407 records quarantined \(0.2% > quality.max_quarantine"):
        enforce_gate(checked, cfg.quality)


def test_gate_fails_when_too_few_examples_remain(tmp_path):
    cfg = load_config(DEMO_CONFIG)
    lines = (DEMO / "tickets.jsonl").read_text(encoding="utf-8").splitlines()[:5]
    raw = collect_landing(cfg.source, write_lines(tmp_path / "l" / "t.jsonl", lines).parent)
    checked = check_batch(raw, cfg.mapping, cfg.quality, tmp_path / "run")
    with pytest.raises(QualityGateFailed, match="5 examples accepted, quality.min_examples is 10"):
        enforce_gate(checked, cfg.quality)


def test_record_missing_a_mapped_field_is_quarantined_not_lost(tmp_path):
    cfg = load_config(DEMO_CONFIG)
    record = json.loads((DEMO / "tickets.jsonl").read_text(encoding="utf-8").splitlines()[0])
    del record["subject"]
    record["ticket_id"] = 42  # a number where text is expected is read as text
    raw = collect_landing(cfg.source, write_lines(tmp_path / "l" / "t.jsonl", [json.dumps(record)]).parent)
    checked = check_batch(raw, cfg.mapping, cfg.quality, tmp_path / "run")
    assert checked.n_accepted == 0
    assert quarantine_by_id(checked)[42]["reasons"] == ["expect_column_values_to_not_be_null(subject)"]


def test_suite_naming_a_column_no_record_has_is_a_config_error(tmp_path):
    cfg = load_config(DEMO_CONFIG, ['mapping.user="{body}"', 'mapping.assistant="queue: {queue}"'])
    suite = json.loads(cfg.quality.suite.read_text())
    suite["expectations"].append({"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "priority"}})
    path = tmp_path / "suite.json"
    path.write_text(json.dumps(suite))
    cfg.quality.suite = path
    raw = collect_landing(cfg.source, write_lines(tmp_path / "l" / "t.jsonl",
                                                  (DEMO / "tickets.jsonl").read_text().splitlines()[:20]).parent)
    with pytest.raises(TuneloopError, match=r"checks column\(s\) .*priority.* that no record has"):
        check_batch(raw, cfg.mapping, cfg.quality, tmp_path / "run")


@pytest.mark.parametrize("text,expected", [
    ("mail me at jo.doe+x@corp.example.org today", "mail me at [EMAIL] today"),
    ("call +44 20 7946 0958 now", "call [PHONE] now"),
    ("order 12345 cost $12.50", "order 12345 cost $12.50"),
])
def test_redact_pii(text, expected):
    assert redact_pii(text)[0] == expected
