import json
import subprocess
import sys

from conftest import ROOT


def run_cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], cwd=ROOT, capture_output=True, text=True, **kw)


def test_help_lists_the_run_command():
    out = run_cli("--help")
    assert out.returncode == 0
    assert "run" in out.stdout and "Run the retrain flow once" in out.stdout


def test_help_imports_no_heavy_library():
    """What keeps `tuneloop --help` instant: none of the heavy stacks load until a command needs them."""
    code = ("import sys; sys.argv=['tuneloop','--help']\n"
            "from flows import cli\n"
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
    assert out.returncode == 1, out.stderr
    assert "error: evaluate.holdout:" in out.stderr and "does not exist" in out.stderr, out.stderr
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
