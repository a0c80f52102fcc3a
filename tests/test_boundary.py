"""Bad input never blocks the queue, the landing folder is a boundary, and data is never read as markup.

Gate-level tests run collect + quality in-process (fast); the markup tests run the real CLI in a subprocess,
because rich's markup is interpreted only where the CLI prints.
"""

import builtins
import io
import os
import subprocess
import sys
from pathlib import Path

import orjson
import pytest

from conftest import DEMO, DEMO_CONFIG, ROOT, accepted, gate_folder, write_lines
from tuneloop.core.config import load_config
from tuneloop.core.mapping import required_fields
from tuneloop.core.records import DatasetVersion
from tuneloop.lib.gate import check_batch
from tuneloop.lib.ledger import Ledger, consume
from tuneloop.lib.sources import make_source

CANARY = "CANARY-7f3a9c-SECRET"  # recognisable content of files outside the landing folder


@pytest.fixture(scope="module")
def cfg():
    return load_config(DEMO_CONFIG)


@pytest.fixture(scope="module")
def good_lines() -> list[str]:
    """The demo's first 30 tickets: all pass the gate."""
    return (DEMO / "tickets.jsonl").read_text(encoding="utf-8").splitlines()[:30]


def quarantine(checked) -> list[dict]:
    return [orjson.loads(line) for line in checked.quarantine_path.read_bytes().splitlines()]


def reconciles(checked) -> bool:
    return checked.n_read == checked.n_accepted + checked.n_quarantined + checked.n_duplicates


def collect(folder: Path, cfg, ledger: Ledger | None = None):
    return make_source(cfg.source, folder, required_fields(cfg.mapping)).collect(ledger or Ledger())


def spy_opens(monkeypatch, deny: set[str] = frozenset()) -> list[str]:
    """Every path opened in this process from now on (resolved); opening one in ``deny`` raises EACCES, as a
    file without read permission does for a user who is not root."""
    opened: list[str] = []

    def wrap(original):
        def spying_open(file, *args, **kwargs):
            if isinstance(file, str | bytes | os.PathLike):
                where = os.path.realpath(os.fsdecode(file))
                opened.append(where)
                if where in deny:
                    raise PermissionError(13, "Permission denied", os.fsdecode(file))
            return original(file, *args, **kwargs)
        return spying_open

    monkeypatch.setattr(builtins, "open", wrap(builtins.open))
    monkeypatch.setattr(io, "open", wrap(io.open))  # pathlib.Path.open calls io.open
    return opened


def deny_reading(path: Path, monkeypatch) -> None:
    """Make ``path`` unreadable: chmod 000 for a normal user; root reads through it, so there the open is refused
    in-process instead (the same PermissionError the kernel gives)."""
    if os.geteuid() != 0:
        path.chmod(0)
        return
    spy_opens(monkeypatch, deny={os.path.realpath(path)})


def allow_reading(path: Path, monkeypatch) -> None:
    if os.geteuid() != 0:
        path.chmod(0o644)
    else:
        monkeypatch.undo()


# ---- 10: bad input never blocks the queue --------------------------------------------------------------


def test_a_record_nested_300_levels_deep_is_quarantined_and_the_rest_goes_on(tmp_path, cfg, good_lines):
    deep = orjson.loads(good_lines[0]) | {"ticket_id": "LF-DEEP"}
    line = orjson.dumps(deep).decode()[:-1] + ', "attachments": ' + "[" * 300 + "]" * 300 + "}"
    write_lines(tmp_path / "landing" / "a.jsonl", [good_lines[0], line, *good_lines[1:]])
    checked = gate_folder(tmp_path / "landing", cfg, tmp_path / "run")
    assert (checked.n_read, checked.n_accepted, checked.n_quarantined, checked.n_duplicates) == (31, 30, 1, 0)
    [entry] = quarantine(checked)
    assert entry["line"] == 2 and entry["reasons"][0].startswith("parse: nested deeper than")
    assert "LF-DEEP" not in accepted(checked)


def test_a_file_that_vanishes_while_collect_hashes_it_is_quarantined_and_the_rest_goes_on(
        tmp_path, cfg, good_lines, monkeypatch):
    import tuneloop.lib.sources as collect_module

    landing = tmp_path / "landing"
    write_lines(landing / "a.jsonl", good_lines[:20])
    gone = write_lines(landing / "b.jsonl", good_lines[20:])
    original = collect_module.sha256_file

    def delete_first(path):  # the file is listed, then removed before its content is read
        if Path(path) == gone:
            gone.unlink()
        return original(path)

    monkeypatch.setattr(collect_module, "sha256_file", delete_first)
    raw = collect(landing, cfg)
    assert [Path(f.path).name for f in raw.files] == ["a.jsonl"]
    [entry] = raw.rejected
    assert entry.source == str(gone) and entry.line == 0
    assert entry.reasons == ["unreadable: the file vanished between listing and reading"]
    assert "sha256" not in entry.record  # nothing to consume: a file that comes back is collected then
    checked = check_batch(raw, cfg.source, cfg.mapping, cfg.quality, tmp_path / "run")
    assert (checked.n_read, checked.n_accepted, checked.n_quarantined) == (21, 20, 1) and reconciles(checked)


def test_a_file_that_vanishes_before_the_gate_reads_it_is_quarantined_and_the_rest_goes_on(
        tmp_path, cfg, good_lines):
    landing = tmp_path / "landing"
    write_lines(landing / "a.jsonl", good_lines[:20])
    gone = write_lines(landing / "b.jsonl", good_lines[20:])
    raw = collect(landing, cfg)
    assert len(raw.files) == 2
    gone.unlink()  # between collect (listing, hashing) and the quality stage (reading)
    checked = check_batch(raw, cfg.source, cfg.mapping, cfg.quality, tmp_path / "run")
    assert (checked.n_read, checked.n_accepted, checked.n_quarantined) == (21, 20, 1) and reconciles(checked)
    [entry] = quarantine(checked)
    assert entry["source"] == str(gone) and entry["line"] == 0
    assert entry["reasons"] == ["unreadable: the file vanished between listing and reading"]
    assert checked.unread_sources == [str(gone)]
    ledger = consume(Ledger(), raw, DatasetVersion(version="v1", path="x", n_examples=20), checked.unread_sources)
    assert [c.name for c in ledger.files.values()] == ["a.jsonl"]  # a copy landing again is new, not "consumed"


def test_a_file_without_read_permission_is_quarantined_then_collected_once_readable(
        tmp_path, cfg, good_lines, monkeypatch):
    landing = tmp_path / "landing"
    write_lines(landing / "a.jsonl", good_lines[:20])
    locked = write_lines(landing / "b.jsonl", good_lines[20:])
    deny_reading(locked, monkeypatch)
    raw = collect(landing, cfg)
    assert [Path(f.path).name for f in raw.files] == ["a.jsonl"]
    [entry] = raw.rejected
    assert entry.source == str(locked) and entry.reasons == ["unreadable: permission denied"]
    checked = check_batch(raw, cfg.source, cfg.mapping, cfg.quality, tmp_path / "run")
    assert (checked.n_read, checked.n_accepted, checked.n_quarantined) == (21, 20, 1) and reconciles(checked)

    ledger = consume(Ledger(), raw, DatasetVersion(version="v1", path="x", n_examples=20))
    assert [c.name for c in ledger.files.values()] == ["a.jsonl"]  # the locked file is not taken as consumed
    allow_reading(locked, monkeypatch)
    again = collect(landing, cfg, ledger)
    assert [Path(f.path).name for f in again.files] == ["b.jsonl"] and not again.rejected


def test_a_permission_lost_before_the_gate_reads_the_file_is_quarantined(tmp_path, cfg, good_lines, monkeypatch):
    landing = tmp_path / "landing"
    write_lines(landing / "a.jsonl", good_lines[:20])
    locked = write_lines(landing / "b.csv", ["ticket_id,subject,body,queue,answer", "LF-1,s,b,sync,a"])
    raw = collect(landing, cfg)
    deny_reading(locked, monkeypatch)
    checked = check_batch(raw, cfg.source, cfg.mapping, cfg.quality, tmp_path / "run")
    assert (checked.n_read, checked.n_accepted, checked.n_quarantined) == (21, 20, 1) and reconciles(checked)
    assert [(q["source"], q["reasons"]) for q in quarantine(checked)] == [
        (str(locked), ["unreadable: permission denied"])]


def test_a_jsonl_file_with_a_utf8_bom_keeps_its_first_record(tmp_path, cfg, good_lines):
    landing = tmp_path / "landing"
    landing.mkdir()
    (landing / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + "\n".join(good_lines).encode() + b"\n")
    checked = gate_folder(landing, cfg, tmp_path / "run")
    assert (checked.n_read, checked.n_accepted, checked.n_quarantined) == (30, 30, 0) and reconciles(checked)
    first = orjson.loads(good_lines[0])["ticket_id"]
    assert accepted(checked)[first].line == 1


# ---- 11: the landing folder is a boundary ---------------------------------------------------------------


def outside_files(tmp_path: Path, good_lines: list[str]) -> Path:
    """A folder beside the landing folder whose files carry the canary (JSON records, a CSV, a passwd-like file)."""
    outside = tmp_path / "outside"
    record = orjson.loads(good_lines[0]) | {"ticket_id": CANARY, "body": f"{CANARY} leaked body text"}
    write_lines(outside / "secret.jsonl", [orjson.dumps(record).decode(), f"root:x:0:0:{CANARY}:/root:/bin/bash"])
    write_lines(outside / "secret.csv", [f"{CANARY}:$6$salt$hash:19000:0:99999:7:::", "x,y"])
    return outside


def test_a_symlink_out_of_the_landing_folder_is_refused_and_nothing_of_its_target_is_read(
        tmp_path, cfg, good_lines, monkeypatch, capsys, caplog):
    caplog.set_level("DEBUG")
    outside = outside_files(tmp_path, good_lines)
    landing = tmp_path / "landing"
    write_lines(landing / "a.jsonl", good_lines)
    (landing / "passwd.jsonl").symlink_to(outside / "secret.jsonl")
    (landing / "shadow.csv").symlink_to(outside / "secret.csv")
    opened = spy_opens(monkeypatch)
    checked = gate_folder(landing, cfg, tmp_path / "run")

    assert not any(p.startswith(str(outside)) for p in opened), "a file outside the landing folder was opened"
    assert (checked.n_read, checked.n_accepted, checked.n_quarantined) == (32, 30, 2) and reconciles(checked)
    refused = {Path(q["source"]).name: q for q in quarantine(checked)}
    assert set(refused) == {"passwd.jsonl", "shadow.csv"}
    for q in refused.values():
        assert q["line"] == 0 and q["reasons"] == [
            "refused: symlink_outside_landing (the link resolves outside the landing folder; not read)"]
    every_output = b"".join(p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file())
    out = capsys.readouterr()
    assert CANARY not in every_output.decode(errors="replace") + out.out + out.err + caplog.text


def test_a_symlinked_folder_out_of_the_landing_folder_is_refused(tmp_path, cfg, good_lines, monkeypatch):
    outside = outside_files(tmp_path, good_lines)
    landing = tmp_path / "landing"
    write_lines(landing / "a.jsonl", good_lines)
    (landing / "shared").symlink_to(outside, target_is_directory=True)
    source = cfg.source.model_copy(update={"patterns": ["*.jsonl", "*/*.jsonl"]})
    opened = spy_opens(monkeypatch)
    raw = make_source(source, landing, required_fields(cfg.mapping)).collect(Ledger())
    assert not any(p.startswith(str(outside)) for p in opened)
    assert [Path(f.path).name for f in raw.files] == ["a.jsonl"]
    assert [(Path(q.source).name, q.reasons[0].split(" ")[1]) for q in raw.rejected] == [
        ("secret.jsonl", "symlink_outside_landing")]


def test_a_refused_symlink_is_reported_once_and_again_when_it_points_elsewhere(tmp_path, cfg, good_lines):
    outside = outside_files(tmp_path, good_lines)
    landing = tmp_path / "landing"
    write_lines(landing / "a.jsonl", good_lines)
    link = landing / "passwd.jsonl"
    link.symlink_to(outside / "secret.jsonl")
    raw = collect(landing, cfg)
    assert [q.reasons[0].split(" ")[1] for q in raw.rejected] == ["symlink_outside_landing"]
    ledger = consume(Ledger(), raw, DatasetVersion(version="v1", path="x", n_examples=30))
    again = collect(landing, cfg, ledger)
    assert again.nothing_new and again.already_consumed == 2  # a.jsonl and the link, as it was refused
    link.unlink()
    link.symlink_to(outside / "secret.csv")  # pointed elsewhere: a new thing to refuse
    assert [Path(q.source).name for q in collect(landing, cfg, ledger).rejected] == ["passwd.jsonl"]


def test_a_symlink_inside_the_landing_folder_is_read(tmp_path, cfg, good_lines):
    landing = tmp_path / "landing"
    write_lines(landing / "archive" / "tickets.jsonl", good_lines)
    (landing / "latest.jsonl").symlink_to(landing / "archive" / "tickets.jsonl")
    checked = gate_folder(landing, cfg, tmp_path / "run")
    assert (checked.n_read, checked.n_accepted, checked.n_quarantined) == (30, 30, 0)


def test_a_symlink_loop_is_refused_with_its_reason(tmp_path, cfg, good_lines):
    landing = tmp_path / "landing"
    write_lines(landing / "a.jsonl", good_lines)
    (landing / "x.jsonl").symlink_to(landing / "y.jsonl")
    (landing / "y.jsonl").symlink_to(landing / "x.jsonl")
    checked = gate_folder(landing, cfg, tmp_path / "run")
    assert (checked.n_read, checked.n_accepted, checked.n_quarantined) == (32, 30, 2) and reconciles(checked)
    assert {Path(q["source"]).name: q["reasons"] for q in quarantine(checked)} == {
        name: ["refused: symlink_loop (the link never resolves to a file; not read)"] for name in ("x.jsonl", "y.jsonl")}


def test_the_landing_watcher_does_not_announce_or_read_a_symlink_out_of_the_folder(
        tmp_path, good_lines, monkeypatch):
    from tuneloop.app.watch import Watcher

    outside = outside_files(tmp_path, good_lines)
    landing = tmp_path / "landing"
    write_lines(landing / "a.jsonl", good_lines)
    (landing / "passwd.jsonl").symlink_to(outside / "secret.jsonl")
    config = load_config(DEMO_CONFIG, [f"source.landing={landing}"])
    opened = spy_opens(monkeypatch)
    landed = Watcher(config, tmp_path / "home").poll()
    assert not any(p.startswith(str(outside)) for p in opened)
    assert [f["name"] for f in landed["files"]] == ["a.jsonl"]


# ---- 12: no markup from data -----------------------------------------------------------------------------


def run_cli(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {"TUNELOOP_HOME": str(home), "PATH": "", "DO_NOT_TRACK": "true", "COLUMNS": "400"}
    return subprocess.run([sys.executable, "-m", "tuneloop.app.cli", *args], cwd=ROOT, capture_output=True,
                          text=True, env=env)


def test_the_cli_prints_a_file_name_with_markup_as_it_is(tmp_path, good_lines):
    path = write_lines(tmp_path / "[bold red]pwned[blink].jsonl", good_lines)
    out = run_cli("check", str(path), home=tmp_path / "home")
    assert out.returncode == 0, out.stderr
    assert f"{path}: read 30 = accepted 30 + quarantined 0 + duplicates 0" in out.stdout, out.stdout


def test_the_cli_prints_a_path_with_markup_as_it_is(tmp_path, good_lines):
    folder = tmp_path / "in[/]box"
    path = write_lines(folder / "tickets.jsonl", good_lines)
    out = run_cli("check", str(path), home=tmp_path / "home")
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert f"{path}: read 30" in out.stdout
    missing = run_cli("check", str(folder / "[/]gone.jsonl"), home=tmp_path / "home")
    assert missing.returncode == 2 and "Traceback" not in missing.stderr, missing.stderr
    assert f"error: {folder / '[/]gone.jsonl'}: no such file" in missing.stderr


def test_the_cli_prints_a_csv_header_with_markup_as_it_is(tmp_path):
    path = write_lines(tmp_path / "odd.csv", ["ticket_id,[/],[bold]subject[/bold],queue,answer", "1,x,y,sync,z"])
    out = run_cli("check", str(path), home=tmp_path / "home")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert "no column 'subject', 'body' (named in the mapping config); columns in this file: ticket_id, [/], " \
           "[bold]subject[/bold], queue, answer" in out.stderr, out.stderr


def test_the_run_summary_prints_messages_and_paths_with_markup_as_they_are(tmp_path, capsys):
    from tuneloop.app.report import print_retrain_summary
    from tuneloop.core.records import (
        EvalReport,
        ModelScore,
        ModelVersion,
        PromotionDecision,
        RetrainResult,
    )
    from tuneloop.core.state import StateLayout

    state = StateLayout(tmp_path / "[red]home[/]")
    print_retrain_summary(RetrainResult(status="nothing_new", message="nothing new in [/]odd", run_dir=tmp_path),
                          state)
    assert "nothing new in [/]odd; the champion is unchanged." in capsys.readouterr().out

    score = ModelScore(n_examples=4, accuracy=0.5)
    report = EvalReport(n_examples=4, base=score, candidate=score, predictions_path=tmp_path / "p.jsonl")
    decision = PromotionDecision(promoted=False, reason="candidate [b]worse[/b] than [/]", baseline="base", delta=0.0)
    version = ModelVersion(name="[blink]model", version="3", run_id="r", aliases=["challenger"], decision=decision,
                           tracking_uri="sqlite:///x.db")
    print_retrain_summary(RetrainResult(status="trained", report=report, model_version=version,
                                        run_dir=tmp_path / "run[/]1", dataset_version="d1"), state)
    out = " ".join(capsys.readouterr().out.split())
    assert "Registered [blink]model version 3 with alias challenger; champion unchanged." in out
    assert "Decision: candidate [b]worse[/b] than [/]" in out
    assert f"Run folder: {tmp_path / 'run[/]1'}" in out
    assert "[red]home[/]" in out
