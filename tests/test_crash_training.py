"""Nothing lost, nothing doubled (issue #17, points 6-8): what a kill during training or evaluation leaves on
disk does not break, or change, the next run.

State is damaged the way a SIGKILL leaves it: a training killed after its last checkpoint but before its
``finished`` copy; a checkpoint whose ``trainer_state.json`` (written last) is missing or cut short; a
generation cache whose last line was cut mid-append. One test kills the real CLI (tests/faults.py).
"""

import json
import logging
import multiprocessing
import shutil

import pytest
from faults import run_cli, run_cli_killed_at

from conftest import DEMO, DEMO_CONFIG, demo_export
from tuneloop.core.config import load_config
from tuneloop.lib.answerers import GenerationCache
from tuneloop.lib.heldout import HeldOutExample


def examples(n: int, start: int = 0, size: int = 40) -> list[HeldOutExample]:
    return [HeldOutExample(record_id=f"r{i}", prompt=[{"role": "user", "content": f"ticket {i} " + "x" * size}],
                           expected="", label=None) for i in range(start, start + n)]


def answer(e: HeldOutExample) -> str:
    return f"queue: billing\nanswer to {e.record_id} " + "y" * 150


class Producer:
    """A model stand-in that counts what it was asked."""

    def __init__(self):
        self.asked: list[str] = []

    def __call__(self, exs: list[HeldOutExample]) -> list[str]:
        self.asked += [e.record_id for e in exs]
        return [answer(e) for e in exs]


def cache_file(folder):
    (path,) = folder.glob("*.jsonl")
    return path


# --- point 8: the generation cache ---------------------------------------------------------------------------

def test_a_cache_line_cut_mid_append_is_dropped_and_generated_again(tmp_path, caplog):
    held = examples(5)
    first = Producer()
    GenerationCache(tmp_path, 16).answers("model-a", held, first)
    path = cache_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:-40])  # a kill during the append: the last line stops mid-way, no newline

    again = Producer()
    with caplog.at_level(logging.WARNING):
        got = GenerationCache(tmp_path, 16).answers("model-a", held, again)
    assert got == [answer(e) for e in held]
    assert again.asked == ["r4"]  # only the cut answer is asked again
    assert any("incomplete last line" in r.getMessage() for r in caplog.records)
    rows = [json.loads(line) for line in path.read_bytes().splitlines()]  # repaired: every line whole
    assert len(rows) == 5 and path.read_bytes().endswith(b"\n")

    third = Producer()
    assert GenerationCache(tmp_path, 16).answers("model-a", held, third) == got and third.asked == []


def test_a_garbled_cache_line_is_skipped_with_a_warning(tmp_path, caplog):
    held = examples(4)
    GenerationCache(tmp_path, 16).answers("model-a", held, Producer())
    path = cache_file(tmp_path)
    lines = path.read_bytes().splitlines(keepends=True)
    lines[1] = b'{"k": "0123", "a": \x00\xff garbage\n'
    path.write_bytes(b"".join(lines))

    again = Producer()
    with caplog.at_level(logging.WARNING):
        got = GenerationCache(tmp_path, 16).answers("model-a", held, again)
    assert got == [answer(e) for e in held] and again.asked == ["r1"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1 and "line 2" in warned[0] and path.name in warned[0]
    assert all(json.loads(line) for line in path.read_bytes().splitlines())  # set right while appending
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        GenerationCache(tmp_path, 16).answers("model-a", held, Producer())
    assert not caplog.records  # said once, not on every later run


def _append_together(folder: str, start: int, barrier) -> None:
    def produce(exs):
        barrier.wait(timeout=60)  # both processes append at the same moment
        return [answer(e) for e in exs]

    from pathlib import Path

    GenerationCache(Path(folder), 16).answers("shared-model", examples(1000, start, size=400), produce)


def test_two_processes_appending_at_once_leave_every_line_whole(tmp_path):
    """Two evaluations of the same model (the base is shared by every run) append to one file at once."""
    ctx = multiprocessing.get_context("spawn")  # not fork: the session has threads (Prefect, torch)
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_append_together, args=(str(tmp_path), start, barrier)) for start in (0, 1000)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    rows = [json.loads(line) for line in cache_file(tmp_path).read_bytes().splitlines()]
    assert len(rows) == 2000
    later = Producer()
    held = examples(1000, 0, size=400) + examples(1000, 1000, size=400)
    assert GenerationCache(tmp_path, 16).answers("shared-model", held, later) == [answer(e) for e in held]
    assert later.asked == []


# --- points 6 and 7: checkpoints ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    _, exported, _ = demo_export(root, 300, 8)
    return root, exported


def weights(adapter_dir) -> bytes:
    return (adapter_dir / "adapter_model.safetensors").read_bytes()


def steps_saved(key_dir) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in key_dir.glob("checkpoint-*"))


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ["train.local.max_steps=6", "train.local.eval_every=3", "train.local.warmup_steps=0"],
    # a learning rate far too high: early stopping ends the run short of max_steps, the best checkpoint is kept
    ["train.local.max_steps=40", "train.local.eval_every=2", "train.local.learning_rate=0.3",
     "train.local.warmup_steps=0", "train.local.early_stopping_patience=1"],
], ids=["all-steps", "stopped-early"])
def test_a_finished_training_without_its_finished_copy_is_not_stepped_again(workspace, tmp_path, overrides):
    """Killed after the last checkpoint was written, before (or while) ``finished`` was: the rerun takes the
    final checkpoint as the result, the one the first run kept, and trains no further step."""
    from tuneloop.lib.checkpoints import FINISHED
    from tuneloop.tasks.train_local import train_lora

    root, exported = workspace
    cfg = load_config(DEMO_CONFIG, overrides)
    ckpt = tmp_path / "checkpoints"
    first = train_lora(exported, cfg.train, root / "models", tmp_path / "first", ckpt)
    (key_dir,) = ckpt.iterdir()
    saved = steps_saved(key_dir)
    assert max(saved) == first.steps
    shutil.rmtree(key_dir / FINISHED)
    (key_dir / (FINISHED + ".tmp") / "adapter").mkdir(parents=True)  # what a kill while copying it leaves

    again = train_lora(exported, cfg.train, root / "models", tmp_path / "again", ckpt)
    assert again.steps == first.steps and again.resumed_from_step == first.steps  # not step 7/6
    assert steps_saved(key_dir) == saved  # no checkpoint past the end
    assert again.best_step == first.best_step and again.stopped_early == first.stopped_early
    assert weights(again.adapter_path) == weights(first.adapter_path)  # the model the first run kept
    assert again.loss_history == first.loss_history
    assert (key_dir / FINISHED / "trained.json").is_file() and not (key_dir / (FINISHED + ".tmp")).exists()
    third = train_lora(exported, cfg.train, root / "models", tmp_path / "third", ckpt)
    assert third.train_seconds == 0.0 and weights(third.adapter_path) == weights(first.adapter_path)


@pytest.mark.slow
@pytest.mark.parametrize("damage", ["missing", "cut"])
def test_a_checkpoint_cut_short_by_a_kill_is_removed_and_the_previous_one_resumed(workspace, tmp_path, caplog,
                                                                                     damage):
    """``trainer_state.json`` is the last file a checkpoint gets: without it (or with half of it) the checkpoint
    is incomplete, and the run resumes from the one before instead of failing on every later run."""
    from tuneloop.lib.checkpoints import FINISHED
    from tuneloop.tasks.train_local import train_lora

    root, exported = workspace
    cfg = load_config(DEMO_CONFIG, ["train.local.max_steps=6", "train.local.eval_every=2",
                                    "train.local.warmup_steps=0"])
    ckpt = tmp_path / "checkpoints"
    train_lora(exported, cfg.train, root / "models", tmp_path / "first", ckpt)
    (key_dir,) = ckpt.iterdir()
    shutil.rmtree(key_dir / FINISHED)  # killed while saving the last checkpoint: nothing after it ran
    state = key_dir / "checkpoint-6" / "trainer_state.json"
    if damage == "missing":
        state.unlink()
    else:
        state.write_bytes(state.read_bytes()[:200])
    previous = max(s for s in steps_saved(key_dir) if s < 6)

    with caplog.at_level(logging.INFO, logger="tuneloop"):
        again = train_lora(exported, cfg.train, root / "models", tmp_path / "again", ckpt)
    assert again.resumed_from_step == previous and again.steps == 6
    said = [r.getMessage() for r in caplog.records if "checkpoint-6" in r.getMessage() and "incomplete" in r.getMessage()]
    assert len(said) == 1, [r.getMessage() for r in caplog.records]
    assert json.loads(state.read_text())["global_step"] == 6  # saved again, whole
    assert (again.adapter_path / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_a_run_killed_before_its_training_was_marked_finished_trains_no_step_more(tmp_path):
    """The real CLI, SIGKILLed after training wrote its last checkpoint but before ``finished``: the next run
    takes that checkpoint as the model (the first run's best), and steps no further."""
    home = tmp_path / "home"
    (home / "landing").mkdir(parents=True)
    (home / "landing" / "t.jsonl").write_text("".join((DEMO / "tickets.jsonl").read_text().splitlines(True)[:300]))
    env = {"TUNELOOP_HOME": str(home), "PREFECT_HOME": str(tmp_path / "prefect")}
    args = ("run", "--set", "train.local.max_steps=4", "--set", "evaluate.max_examples=8")
    run_cli_killed_at("tuneloop.tasks.train_local:mark_finished", *args, when="before", env=env)
    (key_dir,) = (home / "checkpoints").iterdir()
    assert max(steps_saved(key_dir)) == 4 and not (key_dir / "finished").exists()
    best = json.loads((key_dir / "checkpoint-4" / "trainer_state.json").read_text())["best_model_checkpoint"]
    kept = (key_dir / best.rsplit("/", 1)[-1] / "adapter_model.safetensors").read_bytes()

    out = run_cli(*args, env=env)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-3000:]
    assert "step 5/" not in log and max(steps_saved(key_dir)) == 4, log[-3000:]
    trained = json.loads((key_dir / "finished" / "trained.json").read_text())
    assert trained["steps"] == 4
    assert (key_dir / "finished" / "adapter" / "adapter_model.safetensors").read_bytes() == kept
