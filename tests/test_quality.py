import json
import re

import orjson
import pytest

from conftest import DEMO, DEMO_CONFIG, ROOT, accepted, gate_folder, write_lines
from tuneloop.core.config import load_config
from tuneloop.core.pii import PII_KINDS, pii_kinds, redact_pii, scan_pii
from tuneloop.core.records import TuneloopError
from tuneloop.tasks.quality import QualityGateFailed, enforce_gate


@pytest.fixture(scope="module")
def demo_raw(tmp_path_factory):
    landing = tmp_path_factory.mktemp("landing")
    (landing / "tickets.jsonl").write_bytes((DEMO / "tickets.jsonl").read_bytes())
    return landing


def quarantine_by_id(checked):
    rows = [orjson.loads(line) for line in checked.quarantine_path.read_bytes().splitlines()]
    return {(r["record"].get("ticket_id") if isinstance(r["record"], dict) else f"line {r['line']}"): r for r in rows}


def test_every_planted_bad_record_ends_in_its_place_and_counts_reconcile(demo_raw, tmp_path):
    cfg = load_config(DEMO_CONFIG)
    checked = gate_folder(demo_raw, cfg, tmp_path)
    assert checked.n_read == checked.n_accepted + checked.n_quarantined + checked.n_duplicates == 2407
    q = quarantine_by_id(checked)
    assert q["LF-900001"]["reasons"] == ["expect_column_value_lengths_to_be_between(body)"]  # empty body
    assert q["LF-900002"]["reasons"] == ["expect_column_value_lengths_to_be_between(body)"]  # overlong body
    assert q["LF-900005"]["reasons"] == ["expect_column_values_to_be_in_set(queue)"]  # unknown queue
    assert q["line 1801"]["reasons"][0].startswith("parse: not valid JSON")  # truncated line
    assert len(q) == checked.n_quarantined == 4
    dups = [json.loads(line) for line in checked.duplicates_path.read_text().splitlines()]
    assert dups == [{"source": dups[0]["source"], "line": 1501, "duplicate_of": {"source": dups[0]["source"], "line": 41}}]
    accepted_ = accepted(checked)
    assert "[EMAIL]" in accepted_["LF-900003"].messages[1]["content"]
    assert "@" not in accepted_["LF-900003"].messages[1]["content"]
    assert "[PHONE]" in accepted_["LF-900004"].messages[1]["content"]
    assert checked.n_redacted == 2
    example = accepted_["LF-100000"]
    assert [m["role"] for m in example.messages] == ["system", "user", "assistant"]
    assert example.messages[2]["content"].startswith("queue: sync\n")
    assert example.label == "sync" and example.line == 1 and example.source.endswith("tickets.jsonl")
    enforce_gate(checked, cfg.quality)  # 4 of 2407 is under the demo's 5%


def test_pii_policy_quarantine_sends_pii_records_to_quarantine_with_the_pattern_as_reason(demo_raw, tmp_path):
    cfg = load_config(DEMO_CONFIG, ["quality.pii=quarantine"])
    checked = gate_folder(demo_raw, cfg, tmp_path)
    q = quarantine_by_id(checked)
    # two regexes on body (control characters, e-mail): the reason says which one
    assert q["LF-900003"]["reasons"] == ["expect_column_values_to_not_match_regex(body) [pii-email]", "pii:EMAIL(body)"]
    assert q["LF-900004"]["reasons"] == ["pii:PHONE(body)"]  # libphonenumber, outside GX: no regex in the suite
    assert checked.n_redacted == 0
    assert checked.n_read == checked.n_accepted + checked.n_quarantined + checked.n_duplicates


def test_every_expectation_of_the_suites_is_its_own_outcome_with_a_unique_metric_safe_key(tmp_path):
    """Issue 19: outcomes were merged by (suite, type, column), so the control-character and e-mail regexes on
    ``body`` were one row of the quality-gate table and one MLflow metric; nobody could tell which failed."""
    from tuneloop.tasks.quality import summary_markdown

    cfg = load_config(DEMO_CONFIG, ["quality.pii=quarantine", "quality.min_examples=1", "quality.data_docs=false"])
    base = json.loads((DEMO / "tickets.jsonl").read_text(encoding="utf-8").splitlines()[0])
    records = [base, {**base, "ticket_id": "NUL", "body": "null byte \x00 here"},
               {**base, "ticket_id": "MAIL-1", "body": "write to jo@corp.example.org"},
               {**base, "ticket_id": "MAIL-2", "body": "or to ana@corp.example.org"}]
    checked = gate_folder(write_lines(tmp_path / "l" / "t.jsonl", [json.dumps(r) for r in records]).parent, cfg,
                          tmp_path / "run")

    suites = {name: json.loads(path.read_text())["expectations"]  # the raw suite's includes run-wide uniqueness
              for name, path in (("raw_records", cfg.quality.suite), ("chat_examples", cfg.quality.chat_suite))}
    for name, expectations in suites.items():
        outcomes = [o for o in checked.expectations if o.suite == name]
        assert len(outcomes) == len(expectations)
        assert len({o.key for o in outcomes}) == len(outcomes)
        assert sorted((o.expectation, o.column) for o in outcomes) == sorted(
            (e["type"], e["kwargs"]["column"]) for e in expectations)
    assert len(checked.expectations) == 19
    assert all(re.fullmatch(r"[A-Za-z0-9_./-]+", o.key) for o in checked.expectations)

    by_key = {o.key: o for o in checked.expectations if o.suite == "raw_records"}
    regex = "expect_column_values_to_not_match_regex"
    control, email = by_key[f"{regex}.body.control-characters-and-nul-bytes"], by_key[f"{regex}.body.pii-email"]
    assert (control.success, control.unexpected_count, control.title) == (False, 1, "control characters and NUL bytes")
    assert (email.success, email.unexpected_count, email.title) == (False, 2, "PII: EMAIL")
    # alone of its type and column: the plain key, and the reason tests everywhere match
    assert by_key[f"{regex}.subject"].unexpected_count == 0
    assert by_key["expect_column_value_lengths_to_be_between.body"].success

    q = quarantine_by_id(checked)
    assert q["NUL"]["reasons"] == [f"{regex}(body) [control-characters-and-nul-bytes]"]
    assert q["MAIL-2"]["reasons"] == [f"{regex}(body) [pii-email]", "pii:EMAIL(body)"]
    table = summary_markdown(checked)
    assert "| raw_records | expect_column_values_to_not_match_regex | body | PII: EMAIL | FAIL | 2 |" in table
    assert "| body | control characters and NUL bytes | FAIL | 1 |" in table


def test_expectation_keys_name_repeats_from_the_meta_else_by_position_and_stay_put():
    from types import SimpleNamespace as Config

    from tuneloop.lib.gx import expectation_keys

    def config(type_, column=None, **meta):
        return Config(type=type_, kwargs={"column": column} if column else {}, meta=meta or None)

    suite = [config("expect_column_values_to_match_regex", "code", name="Upper case!"),
             config("expect_column_values_to_match_regex", "code", why="digits, then a dash"),
             config("expect_column_values_to_match_regex", "code"),
             config("expect_column_values_to_match_regex", "code"),
             config("expect_column_values_to_be_in_set", "my col"),  # not metric-safe as it is
             config("expect_table_row_count_to_be_between")]
    keys = expectation_keys(suite)
    assert keys == [("expect_column_values_to_match_regex.code.upper-case", "upper-case"),
                    ("expect_column_values_to_match_regex.code.digits-then-a-dash", "digits-then-a-dash"),
                    ("expect_column_values_to_match_regex.code.3", "3"),  # its place among them: naming
                    ("expect_column_values_to_match_regex.code.4", "4"),  # another one renumbers none
                    ("expect_column_values_to_be_in_set.my_col", None),
                    ("expect_table_row_count_to_be_between", None)]
    assert expectation_keys(suite) == keys  # a function of the suite alone: the same every run
    twins = expectation_keys([config("expect_column_values_to_match_regex", "code", why="same"),
                              config("expect_column_values_to_match_regex", "code", why="same")])
    assert len({key for key, _ in twins}) == 2


def test_gate_fails_with_a_clear_message_when_too_much_is_quarantined(demo_raw, tmp_path):
    cfg = load_config(DEMO_CONFIG, ["quality.max_quarantine_fraction=0.001"])
    checked = gate_folder(demo_raw, cfg, tmp_path)
    with pytest.raises(QualityGateFailed, match=r"4 of 2407 records quarantined \(0.2% > quality.max_quarantine"):
        enforce_gate(checked, cfg.quality)


def test_gate_fails_when_too_few_examples_remain(tmp_path):
    cfg = load_config(DEMO_CONFIG)
    lines = (DEMO / "tickets.jsonl").read_text(encoding="utf-8").splitlines()[:5]
    checked = gate_folder(write_lines(tmp_path / "l" / "t.jsonl", lines).parent, cfg, tmp_path / "run")
    with pytest.raises(QualityGateFailed, match="5 examples accepted, quality.min_examples is 10"):
        enforce_gate(checked, cfg.quality)


def test_record_missing_a_mapped_field_is_quarantined_not_lost(tmp_path):
    cfg = load_config(DEMO_CONFIG)
    lines_ = (DEMO / "tickets.jsonl").read_text(encoding="utf-8").splitlines()
    record = json.loads(lines_[0])
    del record["subject"]
    record["ticket_id"] = 42  # a number where text is expected is read as text
    folder = write_lines(tmp_path / "l" / "t.jsonl", [json.dumps(record), lines_[1]]).parent
    checked = gate_folder(folder, cfg, tmp_path / "run")
    assert checked.n_accepted == 1
    assert quarantine_by_id(checked)[42]["reasons"] == ["expect_column_values_to_not_be_null(subject)"]


def test_suite_checking_a_column_the_mapping_does_not_read_is_a_config_error(tmp_path):
    cfg = load_config(DEMO_CONFIG)
    suite = json.loads(cfg.quality.suite.read_text())
    suite["expectations"].append({"type": "expect_column_values_to_not_be_null", "kwargs": {"column": "priority"}})
    path = tmp_path / "suite.json"
    path.write_text(json.dumps(suite))
    cfg.quality.suite = path
    folder = write_lines(tmp_path / "l" / "t.jsonl", (DEMO / "tickets.jsonl").read_text().splitlines()[:20]).parent
    with pytest.raises(TuneloopError, match=r"checks priority, which the mapping does not read"):
        gate_folder(folder, cfg, tmp_path / "run")


@pytest.mark.parametrize("text,expected", [
    ("mail me at jo.doe+x@corp.example.org today", "mail me at [EMAIL] today"),
    ("call +44 20 7946 0958 now", "call [PHONE] now"),
    ("order 12345 cost $12.50 on 2026-10-01", "order 12345 cost $12.50 on 2026-10-01"),
    ("card 4111 1111 1111 1111 please", "card [CARD] please"),          # Luhn-valid
    ("ref 4111111111111112 please", "ref 4111111111111112 please"),  # fails Luhn: not a card
    ("IBAN DE89 3704 0044 0532 0130 00 thanks", "IBAN [IBAN] thanks"),   # mod-97 valid
])
def test_redact_pii(text, expected):
    assert redact_pii(text)[0] == expected


@pytest.mark.parametrize("text,kinds", [
    ("code DE89 3704 0044 0532 0130 02", []),  # fails mod-97
    ("4111 1111 1111 1112", []),              # fails Luhn
    ("pay 5500 0000 0000 0004 or DE89370400440532013000", ["CARD", "IBAN"]),
])
def test_checksummed_kinds_need_a_valid_checksum(text, kinds):
    _, found = scan_pii([text], list(PII_KINDS), redact=False)
    assert [k for k in found.get(0, {}) if k in ("CARD", "IBAN")] == kinds


def test_extra_configured_patterns_are_redacted_and_a_bad_one_is_a_config_error(tmp_path):
    cfg = load_config(DEMO_CONFIG, ["quality.pii_patterns={customer_no: 'CUST-[0-9]{6}'}"])
    kinds = pii_kinds(cfg.quality)
    assert redact_pii("ref CUST-123456 here", kinds) == ("ref [CUSTOMER_NO] here", 1)
    bad = load_config(DEMO_CONFIG, ["quality.pii_patterns={broken: '(unclosed'}"])
    with pytest.raises(TuneloopError, match="quality.pii_patterns.broken: not a valid RE2/Python regex"):
        pii_kinds(bad.quality)


@pytest.mark.parametrize("suite", ["raw_records.json", "scenario_records.json"])
def test_suite_pii_regexes_match_the_redactor(suite):
    """The suite re-checks the body with the same patterns the redactor uses, or it would disagree; phone
    numbers have no regex there (one would quarantine the IP addresses and ids that libphonenumber lets by)."""
    data = json.loads((ROOT / "expectations" / suite).read_text())
    by_kind = {e["meta"]["pii"]: e["kwargs"]["regex"] for e in data["expectations"] if "pii" in e.get("meta", {})}
    assert by_kind == {k.name: k.pattern for k in PII_KINDS if k.name in by_kind}
    assert set(by_kind) == {"EMAIL"}


@pytest.mark.parametrize("policy", ["redact", "quarantine"])
def test_an_ip_address_in_a_ticket_is_neither_redacted_nor_quarantined_as_a_phone_number(tmp_path, policy):
    """Issue 16: ``200.49.219.180`` became ``200.[PHONE]`` (and, under quarantine, the suite's phone regex took it)."""
    cfg = load_config(DEMO_CONFIG, [f"quality.pii={policy}"])
    record = {"ticket_id": "T-1", "subject": "VPN down", "queue": "sync", "answer": "Fixed.",
              "body": "Sync from 200.49.219.180 fails since v3.12.1 (2026-11-22 10:31), order INV-2026-1122-0042."}
    checked = gate_folder(write_lines(tmp_path / "l" / "t.jsonl", [json.dumps(record)]).parent, cfg, tmp_path / "run")
    assert (checked.n_accepted, checked.n_quarantined, checked.n_redacted) == (1, 0, 0)
    assert record["body"] in accepted(checked)["T-1"].messages[1]["content"]


def test_a_heldout_record_and_its_training_twin_map_to_the_same_example_and_hash(tmp_path):
    """One mapping for both paths: stripped fields, PII redacted, the same content hash, so the overlap is found."""
    from tuneloop.lib.heldout import read_heldout

    cfg = load_config(DEMO_CONFIG)
    record = {"ticket_id": "T-1", "subject": "  Invoice question ", "queue": "billing",
              "body": "Please call me at +1 415 555 0134 or write to ana.silva@example.com about invoice 2291.",
              "answer": "Thanks Ana, I have corrected the invoice. "}
    landing = tmp_path / "landing"
    write_lines(landing / "batch.jsonl", [json.dumps(record)])
    trained = accepted(gate_folder(landing, cfg, tmp_path / "run"))["T-1"]
    held = read_heldout(write_lines(tmp_path / "holdout.jsonl", [json.dumps(record)]), cfg.mapping, quality=cfg.quality)
    assert len(held) == 1 and held[0].content_hash == trained.content_hash
    assert held[0].prompt == trained.messages[:-1] and held[0].expected == trained.messages[-1]["content"]
    assert "[EMAIL]" in held[0].prompt[-1]["content"] and "[PHONE]" in held[0].prompt[-1]["content"]
    assert held[0].label == "billing"


def test_a_heldout_record_missing_a_mapped_field_names_the_file_line_and_field(tmp_path):
    from tuneloop.lib.heldout import read_heldout

    cfg = load_config(DEMO_CONFIG)
    path = write_lines(tmp_path / "holdout.jsonl", [
        json.dumps({"ticket_id": "T-1", "subject": "s", "body": "b", "queue": "billing", "answer": "a"}),
        json.dumps({"ticket_id": "T-2", "subject": "s", "queue": "billing", "answer": "a"})])
    with pytest.raises(TuneloopError, match=rf"{path}:2: field 'body' is missing"):
        read_heldout(path, cfg.mapping)


def test_a_heldout_row_without_the_label_field_is_read_for_generation(tmp_path):
    """The label is checked by evaluate where the task needs it, not demanded of every held-out row."""
    from tuneloop.lib.heldout import read_heldout

    cfg = load_config(DEMO_CONFIG, ["mapping.label=channel", "evaluate.task=generation"])
    path = write_lines(tmp_path / "holdout.jsonl", [
        json.dumps({"ticket_id": "T-1", "subject": "s", "body": "b", "queue": "billing", "answer": "a"})])
    held = read_heldout(path, cfg.mapping)
    assert held[0].label is None and held[0].expected == "queue: billing\na"


def test_two_processes_and_shared_chunks_gate_exactly_what_one_process_gates(tmp_path):
    """The parent prepares the first chunk while the child process starts, the child the rest; small files
    share chunks (JSONL and CSV mixed). Same accepted examples, quarantine and duplicates as in one process."""
    import csv

    lines = (DEMO / "tickets.jsonl").read_text(encoding="utf-8").splitlines()
    landing = tmp_path / "landing"
    landing.mkdir()
    for i, start in enumerate(range(0, 90, 9)):  # ten small files, the demo's broken lines among them
        (landing / f"part-{i:02d}.jsonl").write_text("\n".join(lines[start:start + 9]) + "\n", encoding="utf-8")
    rows = [json.loads(line) for line in lines[90:130] if line.startswith("{")]
    rows = [r for r in rows if isinstance(r, dict)]
    fields = sorted({k for r in rows for k in r if all(not isinstance(v, dict | list) for v in [r.get(k)])})
    with (landing / "more.csv").open("w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    (landing / "part-03.jsonl").write_text((landing / "part-03.jsonl").read_text() + lines[0] + "\n")  # a duplicate
    (landing / "part-05.jsonl").write_text((landing / "part-05.jsonl").read_text() + "{not json\n[1, 2]\n{}\n")
    results = {}
    for how in ("never", "always"):
        cfg = load_config(DEMO_CONFIG, ["source.chunk_size=40", f"quality.prepare_in_subprocess={how}"])
        checked = gate_folder(landing, cfg, tmp_path / how)
        quarantine = sorted((e["source"], e["line"], tuple(e["reasons"])) for e in map(json.loads, checked.quarantine_path.open()))
        results[how] = (checked.n_read, checked.n_accepted, checked.n_quarantined, checked.n_duplicates,
                        checked.accepted_path.read_bytes(), quarantine)
    assert results["never"] == results["always"]
    n_read, n_accepted, n_quarantined, n_duplicates, accepted_bytes, _ = results["always"]
    assert n_read == n_accepted + n_quarantined + n_duplicates and n_duplicates >= 1 and n_quarantined >= 3
    assert b"more.csv" in accepted_bytes and b"part-09.jsonl" in accepted_bytes


def test_when_the_two_readers_see_different_files_the_gate_stops_and_loses_nothing(tmp_path, monkeypatch):
    """The child re-reads the chunk the parent prepared and checks its fingerprint: a file changed in between
    (here: the parent's read is made to miss a record) stops the gate with a clear error."""
    import tuneloop.lib.readers as readers

    lines = (DEMO / "tickets.jsonl").read_text(encoding="utf-8").splitlines()
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "a.jsonl").write_text("\n".join(lines[:40]) + "\n", encoding="utf-8")
    real = readers.read_chunks

    def one_record_short(raw, source, chunk_size=None):
        for chunk in real(raw, source, chunk_size):
            chunk.rows, chunk.sources, chunk.lines, chunk.raw = chunk.rows[1:], chunk.sources[1:], chunk.lines[1:], chunk.raw[1:]
            yield chunk

    monkeypatch.setattr(readers, "read_chunks", one_record_short)  # the parent's reader only: the child is a new process
    cfg = load_config(DEMO_CONFIG, ["source.chunk_size=1000", "quality.prepare_in_subprocess=always"])
    with pytest.raises(TuneloopError, match="the landing files changed while the gate read them"):
        gate_folder(landing, cfg, tmp_path / "run")
