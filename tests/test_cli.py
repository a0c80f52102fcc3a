import json
import subprocess
import sys

from conftest import ROOT


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tuneloop.app.cli", *args], cwd=ROOT, capture_output=True, text=True, **kw)


def test_help_lists_the_run_command():
    out = run_cli("--help")
    assert out.returncode == 0
    assert "run" in out.stdout and "Run the retrain flow once" in out.stdout


def test_help_imports_no_heavy_library():
    """What keeps `tuneloop --help` instant: none of the heavy stacks load until a command needs them."""
    code = ("import sys; sys.argv=['tuneloop','--help']\n"
            "from tuneloop.app import cli\n"
            "try: cli.main()\nexcept SystemExit: pass\n"
            "heavy = sorted(m for m in ('torch','transformers','prefect','mlflow','great_expectations','trl','peft')"
            " if m in sys.modules)\nprint('HEAVY', heavy)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert "HEAVY []" in out.stdout, out.stdout + out.stderr


def test_config_error_is_one_readable_line_and_exit_code_2(tmp_path):
    out = run_cli("run", "--set", "train.local.max_stepz=3", env={"TUNELOOP_HOME": str(tmp_path), "PATH": ""})
    assert out.returncode == 2
    assert "error: invalid configuration" in out.stderr
    assert "--set train.local.max_stepz: train.local.max_stepz: unknown key" in out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_run_failure_is_a_message_not_a_traceback(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"evaluate:\n  holdout: {tmp_path / 'missing.jsonl'}\n")
    out = run_cli("run", "--config", str(config), env={"TUNELOOP_HOME": str(tmp_path / "home"), "PATH": "",
                                                      "DO_NOT_TRACK": "true", "PREFECT_HOME": str(tmp_path / "p")})
    assert out.returncode == 2, out.stderr  # found before any work: a config problem
    assert f"evaluate.holdout {tmp_path / 'missing.jsonl'} does not exist" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr + out.stdout


def test_check_reports_each_rejected_record_and_passes_on_the_demo_file(tmp_path):
    env = {"TUNELOOP_HOME": str(tmp_path), "PATH": "", "DO_NOT_TRACK": "true"}
    out = run_cli("check", str(ROOT / "data" / "demo" / "tickets.jsonl"), "--json", env=env)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["passed"] and report["read"] == report["accepted"] + report["quarantined"] + report["duplicates"]
    assert {(r["line"], r["reasons"][0]) for r in report["rejected"]} >= {
        (301, "expect_column_value_lengths_to_be_between(body)"), (1301, "expect_column_values_to_be_in_set(queue)")}
    assert not (tmp_path / "consumed.json").exists()  # check consumes nothing

    human = run_cli("check", str(ROOT / "data" / "demo" / "tickets.jsonl"), env=env)
    assert "line 551: expect_column_value_lengths_to_be_between(body)" in human.stdout
    assert "gate passes" in human.stdout


def test_check_exit_codes_fail_and_unusable(tmp_path):
    env = {"TUNELOOP_HOME": str(tmp_path), "PATH": "", "DO_NOT_TRACK": "true"}
    bad = tmp_path / "bad.jsonl"
    good = json.loads((ROOT / "data" / "demo" / "tickets.jsonl").read_text().splitlines()[0])
    bad.write_text("\n".join([json.dumps({**good, "ticket_id": f"X{i}", "queue": "nope"}) for i in range(20)]))
    out = run_cli("check", str(bad), "--json", env=env)
    assert out.returncode == 1
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert not report["passed"] and "20 of 20 records quarantined" in report["reason"]
    assert run_cli("check", str(tmp_path / "missing.jsonl"), env=env).returncode == 2
    cols = tmp_path / "cols.csv"
    cols.write_text("a,b\n1,2\n")
    missing = run_cli("check", str(cols), env=env)
    assert missing.returncode == 2 and "no column 'subject'" in missing.stderr and "Traceback" not in missing.stderr


def demo_chat_file(path, n=40):
    """The demo tickets as a chat-format fine-tuning file."""
    rows = [json.loads(line) for line in (ROOT / "data" / "demo" / "tickets.jsonl").read_text().splitlines()[:n]]
    path.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Subject: {r['subject']}\n\n{r['body'] or '-'}"},
        {"role": "assistant", "content": f"queue: {r['queue']}\n{r['answer']}"}]}) + "\n" for r in rows))
    return path


def test_check_format_chat_names_each_bad_line_and_its_code(tmp_path):
    env = {"TUNELOOP_HOME": str(tmp_path / "home"), "PATH": "", "DO_NOT_TRACK": "true"}
    path = demo_chat_file(tmp_path / "chat.jsonl")
    ok = run_cli("check", str(path), "--format", "chat", "--json", env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["ok"] and json.loads(ok.stdout)["examples"] == 40
    lines = path.read_text().splitlines()
    lines[2] = '{"messages": [{"role": "user", "content": "q"}]}'
    lines[6] = "not json"
    lines[9] = json.dumps({"messages": [{"role": "user", "content": "q"},
                                        {"role": "assistant", "content": "a", "weight": 0.3}]})
    path.write_text("\n".join(lines) + "\n")
    bad = run_cli("check", str(path), "--format", "chat", "--json", env=env)
    assert bad.returncode == 1, bad.stderr
    report = json.loads(bad.stdout)
    assert report["lines_with_codes"] == [{"line": 3, "codes": ["example_missing_assistant_message"]},
                                          {"line": 7, "codes": ["invalid_json"]}, {"line": 10, "codes": ["invalid_weight"]}]
    human = run_cli("check", str(path), "--format", "chat", env=env)
    assert "line 7: invalid_json" in human.stdout and "Traceback" not in human.stderr


def test_estimate_prints_tokens_epochs_cost_and_refuses_over_budget(tmp_path):
    env = {"TUNELOOP_HOME": str(tmp_path / "home"), "PATH": "", "DO_NOT_TRACK": "true"}
    path = demo_chat_file(tmp_path / "chat.jsonl")
    common = ["estimate", str(path)]  # o200k_base, offline
    out = run_cli(*common, "--json", env=env)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    est = report["estimate"]
    assert est["model"] == "gpt-4o-mini-2024-07-18" and est["n_examples"] == 40 and est["epochs"] == 3
    assert est["billed_tokens"] == 3 * report["tokens"]["total"] and report["tokens"]["counted_with"] == "tiktoken:o200k_base"
    ten = run_cli(*common, "--epochs", "10", "--model", "gpt-4.1-2025-04-14", "--json", env=env)
    assert json.loads(ten.stdout)["estimate"]["billed_tokens"] == 10 * report["tokens"]["total"]
    over = run_cli(*common, "--max-cost-usd", "0.0001", env=env)
    assert over.returncode == 1 and "exceeds train.max_cost_usd $0.00" in over.stdout
    assert "billed tokens" in over.stdout
    unknown = run_cli(*common, "--model", "gpt-9", env=env)
    assert unknown.returncode == 2 and "train.openai.models has no entry for 'gpt-9'" in unknown.stderr


def test_export_command_writes_the_newest_version_and_says_when_there_is_none(tmp_path):
    from conftest import DEMO, DEMO_CONFIG, gate_folder
    from tuneloop.core.config import load_config
    from tuneloop.lib.ledger import Ledger, commit_ledger
    from tuneloop.tasks.snapshot import write_snapshot

    home = tmp_path / "home"
    env = {"TUNELOOP_HOME": str(home), "PATH": "", "DO_NOT_TRACK": "true", "HF_HUB_OFFLINE": "1"}
    none = run_cli("export", env=env)
    assert none.returncode == 1 and "no dataset version" in none.stderr and "tuneloop run" in none.stderr
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "t.jsonl").write_bytes((DEMO / "tickets.jsonl").read_bytes())
    checked = gate_folder(landing, load_config(DEMO_CONFIG), tmp_path / "run")
    dataset = write_snapshot(checked, home / "datasets")
    commit_ledger(Ledger(dataset_version=dataset.version), home / "consumed.json")
    out = run_cli("export", env=env)
    assert out.returncode == 0, out.stderr
    assert f"export {dataset.version}:" in out.stdout and "train tokens (chat-template:tiny)" in out.stdout
    manifest_path = out.stdout.strip().splitlines()[-1].removeprefix("manifest: ")
    manifest = json.loads(open(manifest_path).read())
    assert manifest["dataset_version"] == dataset.version and manifest["counts"]["heldout_overlaps_removed"] > 0
    assert "[reused]" in run_cli("export", env=env).stdout
