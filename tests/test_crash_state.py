"""Nothing lost, nothing doubled (issue #17, points 1-5 and 9): what a run reuses is verified, registration
is idempotent whatever is killed where, and one run holds a state folder at a time."""

from __future__ import annotations

import json
import multiprocessing
import shutil
import subprocess
import sys

import pytest
from faults import run_cli, run_cli_killed_at

from conftest import DEMO, DEMO_CONFIG, ROOT, gate_folder, write_lines
from tuneloop.core.config import load_config
from tuneloop.core.records import TuneloopError
from tuneloop.lib.datasets import SnapshotDamaged, load_snapshot, read_snapshot
from tuneloop.lib.heldout import HeldOutExample, read_heldout
from tuneloop.tasks.export import export_chat_jsonl
from tuneloop.tasks.snapshot import write_snapshot


def _batch(tmp_path, name, rows):
    land = tmp_path / f"land-{name}"
    write_lines(land / "t.jsonl", [json.dumps(r) for r in rows])
    return gate_folder(land, load_config(DEMO_CONFIG), tmp_path / f"run-{name}")


@pytest.fixture(scope="module")
def demo_rows():
    return [json.loads(line) for line in (DEMO / "tickets.jsonl").read_text().splitlines()[:120]]


# 1. a damaged previous snapshot is an error naming the file, never a smaller dataset
@pytest.mark.parametrize("damage", ["truncated_at_a_line", "cut_mid_line", "missing", "line_added"])
def test_a_damaged_previous_snapshot_stops_the_next_version(tmp_path, demo_rows, damage):
    datasets = tmp_path / "datasets"
    first = write_snapshot(_batch(tmp_path, "a", demo_rows[:100]), datasets)
    data = first.path.read_bytes()
    lines = data.splitlines(keepends=True)
    if damage == "truncated_at_a_line":
        first.path.write_bytes(b"".join(lines[:60]))
    elif damage == "cut_mid_line":
        first.path.write_bytes(data[: len(data) // 2])
    elif damage == "missing":
        first.path.unlink()
    else:
        first.path.write_bytes(data + lines[0].replace(b'"content_hash":"', b'"content_hash":"0'))
    new = _batch(tmp_path, "b", demo_rows[100:120])
    with pytest.raises(SnapshotDamaged) as err:
        write_snapshot(new, datasets, first.version)
    assert str(first.path) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(SnapshotDamaged):
        load_snapshot(datasets, first.version)  # also when a run trains on it again
    assert sorted(p.name for p in datasets.iterdir()) == ([] if damage == "missing" else [first.path.name])


def test_a_damaged_copy_of_the_version_being_written_is_written_again(tmp_path, demo_rows):
    datasets = tmp_path / "datasets"
    batch = _batch(tmp_path, "a", demo_rows[:50])
    first = write_snapshot(batch, datasets)
    first.path.write_bytes(b"".join(first.path.read_bytes().splitlines(keepends=True)[:10]))
    again = write_snapshot(batch, datasets)
    assert again.version == first.version and len(read_snapshot(again)) == 50
    assert not list(datasets.glob("*.tmp"))


# 2. an export whose files changed is never reused, also on a (formerly Prefect-cached) rerun; paths are local
def test_a_truncated_export_is_rebuilt_in_the_flow_not_reused(prefect_harness, tmp_path, demo_rows):
    from prefect import flow

    from tuneloop.tasks.export import export_task

    cfg = load_config(DEMO_CONFIG)
    dataset = write_snapshot(_batch(tmp_path, "a", demo_rows[:100]), tmp_path / "datasets")

    @flow
    def export_once():
        return export_task(dataset, cfg.export, [], tmp_path / "exports")

    first = export_once()
    n_lines = len(first.train_path.read_text().splitlines())
    first.train_path.write_text("".join(first.train_path.read_text().splitlines(True)[:5]))
    second = export_once()
    assert len(second.train_path.read_text().splitlines()) == n_lines == second.n_train
    assert not second.reused  # rebuilt: the recorded sha256 no longer matched
    third = export_once()
    assert third.reused and third.sha256 == second.sha256


def test_a_reused_export_points_at_its_own_folder_when_the_state_was_copied(tmp_path, demo_rows):
    cfg = load_config(DEMO_CONFIG)
    dataset = write_snapshot(_batch(tmp_path, "a", demo_rows[:100]), tmp_path / "datasets")
    original = export_chat_jsonl(dataset, cfg.export, [], tmp_path / "home-a" / "exports")
    shutil.copytree(tmp_path / "home-a", tmp_path / "home-b")
    shutil.rmtree(tmp_path / "home-a")
    copied = export_chat_jsonl(dataset, cfg.export, [], tmp_path / "home-b" / "exports")
    assert copied.reused and copied.sha256 == original.sha256
    for path in (copied.directory, copied.train_path, copied.validation_path, copied.manifest_path):
        assert str(path).startswith(str(tmp_path / "home-b")) and path.exists()


# 3. held-out removal comes before the minimum-count rule; a held-out set that is the training data is refused
def test_a_heldout_set_that_is_the_training_data_is_refused_before_training(tmp_path, demo_rows):
    cfg = load_config(DEMO_CONFIG)
    dataset = write_snapshot(_batch(tmp_path, "a", demo_rows[:100]), tmp_path / "datasets")
    examples = read_snapshot(dataset)
    copy = [HeldOutExample(record_id=e.record_id, prompt=e.messages[:-1], expected=e.messages[-1]["content"],
                           label=e.label) for e in examples[:99]]
    with pytest.raises(TuneloopError, match=r"removes 99 of 100 examples .*max_heldout_overlap"):
        export_chat_jsonl(dataset, cfg.export, copy, tmp_path / "exports", min_examples=10)
    assert not (tmp_path / "exports").exists() or not any((tmp_path / "exports").iterdir())

    lenient = cfg.export.model_copy(update={"max_heldout_overlap": 1.0})  # the share allowed: the count still holds
    with pytest.raises(TuneloopError, match=r"only 1 examples left for training .*min_examples is 10"):
        export_chat_jsonl(dataset, lenient, copy, tmp_path / "exports", min_examples=10)
    some = copy[:15]  # 15% removed: within the share, 85 left >= 10
    kept = export_chat_jsonl(dataset, cfg.export, some, tmp_path / "exports", min_examples=10)
    assert kept.n_train + kept.n_validation == 85 and kept.n_heldout_overlaps == 15


def test_the_demo_heldout_set_is_within_the_overlap_share():
    cfg = load_config(DEMO_CONFIG)
    assert read_heldout(cfg.evaluate.holdout, cfg.mapping)  # and the demo flow tests run with the default share
    assert cfg.export.max_heldout_overlap == 0.5  # what tuneloop init --holdout allows at most
    assert "export.max_heldout_overlap" not in cfg.model_settings()  # a guard: changing it retrains nothing


# unique temporary names: two writers of one file never share a temporary file
def _write_many(path: str, tag: str, n: int) -> None:
    from pathlib import Path

    from tuneloop.core.state import write_atomically

    for i in range(n):
        write_atomically(Path(path), f"{tag}-{i}\n".encode() * 200)


def test_two_processes_writing_one_file_atomically_do_not_collide(tmp_path):
    target = tmp_path / "consumed.json"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(str(target), tag, 400)) for tag in "ab"]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    lines = set(target.read_text().splitlines())
    assert len(lines) == 1 and lines.pop() in {"a-399", "b-399"}  # whole, one writer's last
    assert [p.name for p in tmp_path.iterdir()] == ["consumed.json"]


# 9. one run per state folder
_HOLD = """
import sys, time
from pathlib import Path
from tuneloop.core.state import run_lock
with run_lock(Path(sys.argv[1]), "a test holding the lock"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_run_on_a_busy_state_folder_does_nothing_and_says_who_holds_it(tmp_path):
    home = tmp_path / "state"
    write_lines(home / "landing" / "t.jsonl", (DEMO / "tickets.jsonl").read_text().splitlines()[:50])
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(home)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = run_cli("run", "--config", str(DEMO_CONFIG), env={"TUNELOOP_HOME": str(home)}, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert proc.returncode == 1, proc.stderr
    assert "another run is using the state folder" in proc.stderr and "a test holding the lock" in proc.stderr
    assert f"pid {holder.pid}" in proc.stderr and "Traceback" not in proc.stderr
    assert not (home / "consumed.json").exists() and not list((home / "datasets").glob("*"))
    assert not (home / "prefect" / "prefect.db").exists()  # refused before Prefect's database was created
    assert not (home / "mlflow.db").exists()


def test_the_lock_is_reentrant_in_one_process_and_freed_by_a_killed_holder(tmp_path):
    from tuneloop.core.state import run_lock

    home = tmp_path / "state"
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(home)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(TuneloopError, match="another run is using the state folder"):
        with run_lock(home):
            pass
    holder.kill()  # SIGKILL: no cleanup ran, the OS freed the lock
    holder.wait()
    with run_lock(home, "outer"):
        with run_lock(home, "inner"):  # the CLI takes it, then the flow in the same process
            assert json.loads((home / "run.lock.json").read_text())["what"] == "outer"


# the CLI runs below share one small setup: 300 demo tickets, no training steps, 10 held-out examples
NAME = load_config(DEMO_CONFIG).registry.model_name
QUICK = ["--config", str(DEMO_CONFIG), "--set", "train.local.max_steps=0", "--set", "evaluate.max_examples=10"]


def _quick_home(tmp_path, name="state"):
    home = tmp_path / name
    write_lines(home / "landing" / "t.jsonl", (DEMO / "tickets.jsonl").read_text().splitlines()[:300])
    return home, {"TUNELOOP_HOME": str(home)}


def _registry(home):
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{home / 'mlflow.db'}")
    versions = client.search_model_versions(f"name='{NAME}'")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return client, versions, runs


@pytest.mark.slow
def test_two_runs_at_once_train_once_and_register_one_version(tmp_path):
    home, env = _quick_home(tmp_path)
    cmd = [sys.executable, "-m", "tuneloop.app.cli", "run", *QUICK]
    import os

    procs = [subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 1], outs
    busy = next(err for p, (_, err) in zip(procs, outs, strict=True) if p.returncode == 1)
    assert "another run is using the state folder" in busy and "Traceback" not in busy
    _, versions, runs = _registry(home)
    assert len(versions) == 1 and len(runs) == 1


# 4 and 5: the ledger agrees with the registry; one version per trained model whatever is killed where
@pytest.mark.slow
def test_a_kill_after_registering_does_not_register_twice_and_a_deleted_model_is_trained_again(tmp_path):
    home, env = _quick_home(tmp_path)
    run_cli_killed_at("mlflow.tracking.client:MlflowClient.create_run", "run", *QUICK, env=env)
    _, versions, runs = _registry(home)
    assert versions == [] and [r.info.status for r in runs] == ["RUNNING"]  # what the kill left

    run_cli_killed_at("mlflow.tracking.client:MlflowClient.create_model_version", "run", *QUICK, env=env)
    _, versions, runs = _registry(home)
    assert len(versions) == 1 and not versions[0].aliases  # registered, then killed before its aliases
    assert sorted(r.info.status for r in runs) == ["FAILED", "RUNNING"]  # the first kill's run closed

    done = run_cli("run", *QUICK, env=env)
    assert done.returncode == 0, done.stderr
    assert "completing that registration instead of training again" in done.stdout + done.stderr
    client, versions, runs = _registry(home)
    assert len(versions) == 1  # completed, not registered again
    assert set(client.get_model_version(NAME, "1").aliases) >= {"challenger"}
    assert sorted(r.info.status for r in runs) == ["FAILED", "FINISHED"]
    failed = next(r for r in runs if r.info.status == "FAILED")
    assert "killed before it finished" in failed.data.tags["tuneloop.ended"]
    again = run_cli("run", *QUICK, env=env)
    assert again.returncode == 0 and "nothing new" in again.stdout + again.stderr
    assert len(_registry(home)[1]) == 1

    # 4. the ledger says "trained", the registry no longer has the model: the next run trains it again
    client.delete_registered_model(NAME)
    rerun = run_cli("run", *QUICK, env=env)
    assert rerun.returncode == 0, rerun.stderr
    assert "registry has no model version for it" in rerun.stdout + rerun.stderr
    assert len(_registry(home)[1]) == 1  # registered again
