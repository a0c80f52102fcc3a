"""The whole config checked before any work: each problem one line, the CLI exits 2 and trains nothing."""

import json

from test_cli import run_cli

from conftest import DEMO, DEMO_CONFIG
from tuneloop.core.config import load_config
from tuneloop.tasks.preflight import preflight


def test_the_demo_config_has_no_problem():
    assert preflight(load_config(DEMO_CONFIG)) == []


def test_a_regex_that_does_not_compile_is_named():
    problems = preflight(load_config(DEMO_CONFIG, ["evaluate.label_pattern='^queue: (\\S+'", "quality.pii_patterns={ID: '[a-'}"]))
    assert any(p.startswith("evaluate.label_pattern '^queue: (\\\\S+' is not a valid regex (missing )") for p in problems)
    assert any(p.startswith("quality.pii_patterns.id: not a valid RE2/Python regex") for p in problems)
    (region,) = preflight(load_config(DEMO_CONFIG, ["quality.phone_region=XX"]))
    assert region.startswith("phone region 'XX': not a region libphonenumber knows")


def test_a_label_pattern_that_does_not_read_back_the_labels_as_the_template_writes_them():
    # the template writes "queue: billing"; this pattern reads the first word: "queue:"
    problems = preflight(load_config(DEMO_CONFIG, ["evaluate.label_pattern=^\\s*(\\S+)"]))
    assert len(problems) == 1
    assert "does not read back 6 of 6 labels" in problems[0] and "'billing' -> 'queue:'" in problems[0]
    # a label with a space is cut by \S+: one label of seven is wrong
    cfg = load_config(DEMO_CONFIG)
    from tuneloop.tasks.preflight import label_pattern_problems

    (one,) = label_pattern_problems(cfg, ["billing", "data loss"])
    assert "1 of 2 labels" in one and "'data loss' -> 'data'" in one


def test_held_out_fields_and_label_sets_are_checked_against_the_config(tmp_path):
    rows = [json.loads(line) for line in (DEMO / "holdout.jsonl").read_text().splitlines()[:20]]
    rows[3]["queue"] = "legal"  # a label the suite does not allow
    for r in rows:
        r.pop("subject")
    holdout = tmp_path / "holdout.jsonl"
    holdout.write_text("".join(json.dumps(r) + "\n" for r in rows))
    problems = preflight(load_config(DEMO_CONFIG, [f"evaluate.holdout={holdout}"]))
    assert f"{holdout}:1: no field subject that the mapping's templates read" in problems[0]
    assert any("the held-out file has 'legal' too: the label sets must match" in p for p in problems)
    missing = preflight(load_config(DEMO_CONFIG, [f"evaluate.holdout={tmp_path / 'none.jsonl'}"]))
    assert missing == [f"evaluate.holdout {tmp_path / 'none.jsonl'} does not exist"]


def test_classification_needs_a_label_the_assistant_writes():
    problems = preflight(load_config(DEMO_CONFIG, ["mapping.assistant='{answer}'"]))
    assert any("does not write the label field {queue}" in p for p in problems)


def test_run_with_a_broken_pattern_exits_2_with_one_line_before_any_work(tmp_path):
    home = tmp_path / "home"
    (home / "landing").mkdir(parents=True)
    (home / "landing" / "t.jsonl").write_bytes((DEMO / "tickets.jsonl").read_bytes())
    out = run_cli("run", "--config", str(DEMO_CONFIG), "--set", "evaluate.label_pattern='^queue: (\\S+'",
                  env={**__import__("os").environ, "TUNELOOP_HOME": str(home)}, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "is not a valid regex (missing ), unterminated subpattern" in out.stderr
    assert not (home / "datasets").exists() or not any((home / "datasets").iterdir())  # nothing collected


def test_valid_configs_of_other_shapes_pass(tmp_path):
    """No false alarm: chat-messages records, a pattern whose group starts with a space, a generation task."""
    holdout = tmp_path / "holdout.jsonl"
    chat = [{"role": "user", "content": "my card was charged twice"}, {"role": "assistant", "content": "queue: billing"}]
    holdout.write_text(json.dumps({"messages": chat, "queue": "billing"}) + "\n")
    messages = load_config(DEMO_CONFIG, ["mapping.messages=messages", f"evaluate.holdout={holdout}"])
    assert preflight(messages) == []
    assert preflight(load_config(DEMO_CONFIG, ["evaluate.label_pattern='^queue:(.+)$'"])) == []
    assert preflight(load_config(DEMO_CONFIG, ["evaluate.task=generation", "evaluate.primary_metric=rouge_l"])) == []


def test_a_held_out_file_must_be_jsonl_and_the_golden_set_is_checked_too(tmp_path):
    csv = tmp_path / "holdout.csv"
    csv.write_text("ticket_id,subject\n1,x\n")
    (problem,) = preflight(load_config(DEMO_CONFIG, [f"evaluate.holdout={csv}"]))
    assert problem.startswith(f"evaluate.holdout {csv}: a held-out file is JSONL")
    golden = tmp_path / "golden.jsonl"
    golden.write_text(json.dumps({"ticket_id": "g1", "body": "b", "queue": "billing", "answer": "a"}) + "\n")
    (problem,) = preflight(load_config(DEMO_CONFIG, [f"evaluate.golden={golden}"]))
    assert problem.startswith(f"{golden}:1: no field subject")
