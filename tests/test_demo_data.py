import json
import subprocess
import sys

from conftest import DEMO, ROOT


def test_generator_reproduces_the_committed_demo_files_byte_for_byte(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "data" / "generate_demo.py"), "--out", str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("tickets.jsonl", "holdout.jsonl"):
        assert (tmp_path / name).read_bytes() == (DEMO / name).read_bytes(), name


def test_demo_data_is_large_enough_and_holds_the_planted_bad_records():
    lines = (DEMO / "tickets.jsonl").read_text(encoding="utf-8").splitlines()
    assert len(lines) >= 2000
    parsed, unparsable = [], 0
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            unparsable += 1
    assert unparsable == 1
    by_id = {r["ticket_id"]: r for r in parsed}
    assert by_id["LF-900001"]["body"] == ""
    assert len(by_id["LF-900002"]["body"]) > 2000
    assert "@" in by_id["LF-900003"]["body"]
    assert "555" in by_id["LF-900004"]["body"]
    assert by_id["LF-900005"]["queue"] == "hardware"
    assert len(parsed) - len({json.dumps(r, sort_keys=True) for r in parsed}) == 1  # one exact duplicate
    held = [json.loads(line) for line in (DEMO / "holdout.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(held) >= 200
    assert not {r["ticket_id"] for r in held} & set(by_id)
