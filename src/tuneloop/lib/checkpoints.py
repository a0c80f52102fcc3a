"""Training checkpoints: which one a rerun resumes from, and the finished copy that makes a rerun instant.

A checkpoint folder is whole only once the trainer wrote its ``trainer_state.json`` (last, after the weights,
optimizer, scheduler and RNG states): one a kill cut short is removed, never resumed from. When training
ends, its adapter and ``LocalAdapter`` record are copied to ``finished`` in one rename, so a rerun of
finished training reuses them without stepping again.
"""

from __future__ import annotations

from pathlib import Path

import orjson

from tuneloop.core.records import LocalAdapter
from tuneloop.lib.runlog import stage_logger


def step_of(checkpoint: Path) -> int:
    return int(checkpoint.name.rsplit("-", 1)[1])



def checkpoint_problem(checkpoint: Path) -> str | None:
    """Why a checkpoint folder cannot be resumed from (None: it is whole).

    The trainer writes ``trainer_state.json`` last, after the weights, optimizer, scheduler and RNG states: a
    kill while saving leaves it missing or cut short. The adapter weights are checked too (a safetensors
    header whose tensors run past the end of the file), which a lost write after a power cut would leave.
    """
    try:
        state = orjson.loads((checkpoint / "trainer_state.json").read_bytes())
    except FileNotFoundError:
        return "it has no trainer_state.json"
    except (OSError, orjson.JSONDecodeError) as exc:
        return f"its trainer_state.json is unreadable: {exc}"
    if not isinstance(state, dict) or state.get("global_step") != step_of(checkpoint):
        return f"its trainer_state.json is not the state of step {step_of(checkpoint)}"
    weights = checkpoint / "adapter_model.safetensors"
    if weights.is_file():
        from safetensors import safe_open

        try:
            with safe_open(str(weights), "pt"):
                pass
        except Exception as exc:  # safetensors raises its own error type for a cut file
            return f"its adapter weights are unreadable: {exc}"
    return None



def last_complete_checkpoint(checkpoint_dir: Path) -> Path | None:
    """The newest checkpoint that is whole. One that a kill left incomplete is removed (it would fail every
    later run, and the trainer saves that step again); the one before it is resumed instead."""
    import re
    import shutil

    if not checkpoint_dir.is_dir():
        return None
    found = [p for p in checkpoint_dir.iterdir() if p.is_dir() and re.fullmatch(r"checkpoint-\d+", p.name)]
    for checkpoint in sorted(found, key=step_of, reverse=True):
        why = checkpoint_problem(checkpoint)
        if why is None:
            return checkpoint
        stage_logger().warning(f"train: {checkpoint.name} is incomplete ({why}; a run was stopped while saving "
                               "it): removed it, its steps are trained again from the whole checkpoint before it")
        shutil.rmtree(checkpoint)
    return None



def training_ended(checkpoint: Path) -> bool:
    """Whether this checkpoint is where the training ended: its last step, or the step early stopping stopped
    at. Resuming from it would step once more (the trainer checks for the end only after a step)."""
    state = orjson.loads((checkpoint / "trainer_state.json").read_bytes())
    control = (state.get("stateful_callbacks") or {}).get("TrainerControl") or {}
    if isinstance(control, list):
        control = control[-1] if control else {}
    stop = bool((control.get("args") or {}).get("should_training_stop"))
    return stop or state.get("global_step", 0) >= state.get("max_steps", float("inf"))



def take_ended_checkpoint(trainer, checkpoint: Path) -> bool:
    """Make ``trainer`` what it was when that training ended, without a step: its state from the checkpoint and
    the weights it kept (the best checkpoint's, under best-by-validation selection). False where the checkpoint
    holds no adapter weights to load (sharded FSDP): then the run resumes as before."""
    from transformers import TrainerState

    state = TrainerState.load_from_json(str(checkpoint / "trainer_state.json"))
    kept = checkpoint
    if trainer.args.load_best_model_at_end and state.best_model_checkpoint:
        best = checkpoint.parent / Path(state.best_model_checkpoint).name  # by name: the folder may have moved
        if best.is_dir() and checkpoint_problem(best) is None:
            kept = best
        else:
            stage_logger().warning(f"train: the best checkpoint ({best.name}) is gone; keeping {checkpoint.name}")
    if not (kept / "adapter_model.safetensors").is_file():
        return False
    trainer.state = state
    model = trainer.model
    model.load_adapter(str(kept), model.active_adapter)  # what the trainer does to load the best model at the end
    return True



FINISHED = "finished"  # in a checkpoint folder: the adapter training ended with, and its LocalAdapter record



def mark_finished(trained: LocalAdapter, checkpoint_dir: Path) -> None:
    """Keep the final (best) adapter beside the checkpoints, so a rerun of the same training is a copy, not a
    resume. Written to a temporary folder and renamed into place: a kill leaves no ``finished`` or the whole of
    it (a leftover temporary folder is cleared here and ignored by ``finished_training``)."""
    import shutil

    final = checkpoint_dir / FINISHED
    tmp = checkpoint_dir / (FINISHED + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(trained.adapter_path, tmp / "adapter")
    if trained.artifacts_dir is not None and trained.artifacts_dir.is_dir():
        shutil.copytree(trained.artifacts_dir, tmp / "training")
    (tmp / "trained.json").write_text(trained.model_dump_json())
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)



def finished_training(checkpoint_dir: Path, out_dir: Path) -> LocalAdapter | None:
    import shutil

    record = checkpoint_dir / FINISHED / "trained.json"
    if not record.is_file():
        return None
    trained = LocalAdapter.model_validate_json(record.read_bytes())
    if trained.mean_train_loss is None and trained.loss_history and trained.steps > 0:
        # recorded before the two were told apart: its train_loss was the mean, not the last step's
        trained = trained.model_copy(update={"mean_train_loss": trained.train_loss,
                                             "train_loss": trained.loss_history[-1][1]})
    adapter_dir = out_dir / "adapter"
    shutil.copytree(checkpoint_dir / FINISHED / "adapter", adapter_dir, dirs_exist_ok=True)
    artifacts = None
    if (checkpoint_dir / FINISHED / "training").is_dir():
        artifacts = out_dir / "training"
        shutil.copytree(checkpoint_dir / FINISHED / "training", artifacts, dirs_exist_ok=True)
    stage_logger().info(f"train: this training (same data, split and settings) finished before: reusing its "
                        f"adapter ({trained.steps} steps)")
    return trained.model_copy(update={"adapter_path": adapter_dir, "artifacts_dir": artifacts,
                                      "resumed_from_step": trained.steps, "train_seconds": 0.0})
