"""The LoRA training engine: TRL's SFTTrainer built for an export and a config, and one training run in this
process (one device, or one rank under torchrun).

Loss is on assistant tokens only (the chat template marks them with generation blocks), so the model
learns to answer, not to echo tickets. On a CPU the frozen base weights are bf16 where the CPU has bf16
units and the base is a pretrained model (``lib/precision.py``), fp32 otherwise; the adapter and optimizer
are fp32. On CUDA, bf16 mixed precision where the GPU supports it. The local-training stage (``tasks/train_local.py``) decides where and whether to
train; this module trains.
"""

from __future__ import annotations

import hashlib
import os
import resource
import sys
import time
from pathlib import Path

import orjson

from tuneloop.core.config import TrainConfig
from tuneloop.core.models import load_causal_lm, load_tokenizer, quiet_libraries
from tuneloop.core.records import ExportedDataset, LocalAdapter, TuneloopError
from tuneloop.lib.base_model import resolve_base_model
from tuneloop.lib.checkpoints import step_of, take_ended_checkpoint, training_ended
from tuneloop.lib.precision import frozen_dtype
from tuneloop.lib.runlog import stage_logger


def _read_messages(path: Path) -> list[dict]:
    with path.open("rb") as fh:
        return [{"messages": orjson.loads(line)["messages"]} for line in fh if line.strip()]



def _peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return round(torch.cuda.max_memory_allocated() / 2**20, 1)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return round(rss / 2**20 if sys.platform == "darwin" else rss / 1024, 1)



def _check_quantization(train: TrainConfig) -> dict:
    """4-bit QLoRA loads the base through bitsandbytes, which needs CUDA: refused elsewhere, before loading."""
    import torch

    if train.local.quantization == "none":
        return {}
    if not torch.cuda.is_available():
        raise TuneloopError("train.local.quantization: 4bit (QLoRA through bitsandbytes) needs a CUDA GPU and "
                            "this machine has none; use quantization: none here")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TuneloopError("train.local.quantization: 4bit needs bitsandbytes: pip install bitsandbytes") from None
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_compute_dtype=torch.bfloat16)}



def _distributed_args(local, use_cuda: bool) -> dict:
    """Under torchrun each process is one rank; on CPU the ranks talk through gloo (how CI tests DDP)."""
    if local.devices == 1:
        return {}
    args: dict = {"ddp_backend": "nccl" if use_cuda else "gloo", "ddp_find_unused_parameters": False}
    if local.distributed == "fsdp":
        args |= {"fsdp": "full_shard auto_wrap",
                 "fsdp_config": {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
                                 "cpu_ram_efficient_loading": True, "state_dict_type": "SHARDED_STATE_DICT"}}
    return args



MIN_VALIDATION_TO_STOP = 20  # below this many validation examples, the loss moves with the sample, not the model


def early_stopping(patience: int | None, n_validation: int) -> tuple[int | None, str | None]:
    """The patience to train with, and why it is off: a validation set too small to stop on (export's
    ``min_validation`` makes it bigger where the data allows)."""
    if patience and 0 < n_validation < MIN_VALIDATION_TO_STOP:
        return None, (f"no early stopping: {n_validation} validation examples are too few to stop on (fewer than "
                      f"{MIN_VALIDATION_TO_STOP}); training runs its whole budget, and the best checkpoint by "
                      "validation loss is still kept")
    return patience, None


def build_trainer(exported: ExportedDataset, train: TrainConfig, models_dir: Path, checkpoint_dir: Path,
                  callbacks: list | None = None, init_adapter: Path | None = None):
    """The SFTTrainer for this export and config (a test inspects its batches without training)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    local = train.local
    quiet_libraries()
    load_kwargs = _check_quantization(train)
    base_source = resolve_base_model(train, models_dir, stage_logger())
    tokenizer = load_tokenizer(base_source)
    from tuneloop.core.chat_templates import first_conversation, training_chat_template

    # the template with {% generation %} markers that training uses; saved with the adapter, so eval/serving use it
    tokenizer.chat_template = training_chat_template(tokenizer, str(base_source), local.chat_template,
                                                     first_conversation(exported.train_path))
    if local.attn_implementation:
        load_kwargs["attn_implementation"] = local.attn_implementation
    use_cuda = torch.cuda.is_available()
    dtype, why = frozen_dtype(train, use_cuda)
    if not use_cuda and "quantization_config" not in load_kwargs:
        load_kwargs["dtype"] = getattr(torch, dtype)
        if int(os.environ.get("RANK", "0")) == 0:
            stage_logger().info(f"train: frozen base weights in {dtype} ({why}); LoRA weights and optimizer in "
                                "float32")
    model = load_causal_lm(base_source, **load_kwargs)
    if init_adapter is not None:  # a warm start: the champion's adapter, trained further
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(init_adapter), is_trainable=True)
    lora = LoraConfig(r=local.lora.r, lora_alpha=local.lora.alpha, lora_dropout=local.lora.dropout,
                      target_modules=local.lora.target_modules, task_type="CAUSAL_LM")
    # Padding-free batches are one flattened sequence. Flash attention's varlen kernels cost what the examples
    # cost; sdpa/eager build a dense mask over the whole flattened batch (quadratic in batch x max_length),
    # so there each micro-batch is one packed row and the batch is reached by gradient accumulation.
    varlen = (local.attn_implementation or "").startswith(("flash_attention", "kernels-community/flash"))
    rows = local.batch_size if (varlen or not local.packing) else 1
    train_dataset = Dataset.from_list(_read_messages(exported.train_path))
    if len(train_dataset) == 0:
        raise TuneloopError(f"train: {exported.train_path} holds no examples")
    validation = _read_messages(exported.validation_path) if exported.validation_path.is_file() else []
    eval_dataset = Dataset.from_list(validation) if validation else None
    budget = {"max_steps": local.max_steps} if local.max_steps is not None else {"num_train_epochs": local.epochs}
    # Validation loss and checkpoints at the same steps: the best checkpoint is one that was saved.
    every = local.eval_every or 0.1  # a float below 1 is a fraction of the run's steps
    selection = {"eval_strategy": "steps", "eval_steps": every, "load_best_model_at_end": True,
                 "metric_for_best_model": "eval_loss", "greater_is_better": False,
                 "per_device_eval_batch_size": rows} if eval_dataset is not None else {}
    args = SFTConfig(
        output_dir=str(checkpoint_dir),
        **budget,
        **selection,
        per_device_train_batch_size=rows,
        gradient_accumulation_steps=local.batch_size // rows,
        learning_rate=train.learning_rate,
        warmup_steps=local.warmup_steps if local.max_steps is None else min(local.warmup_steps, local.max_steps),
        lr_scheduler_type="cosine",
        logging_steps=1,  # the loss of every step (loss/train, "loss at the last step"); the log prints fewer
        max_length=local.max_length,
        packing=local.packing,
        packing_strategy="bfd",  # padding-free: packed examples keep their own position ids and attention
        assistant_only_loss=True,
        seed=local.seed,
        use_cpu=not use_cuda,
        bf16=use_cuda and torch.cuda.is_bf16_supported() and local.precision != "fp32",
        gradient_checkpointing=local.gradient_checkpointing,
        save_strategy="steps",
        save_steps=every,
        save_total_limit=2,  # the best and the last
        include_num_input_tokens_seen="non_padding",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        **_distributed_args(local, use_cuda),
    )
    callbacks = list(callbacks or [])
    patience, note = early_stopping(local.early_stopping_patience, len(validation))
    if note and int(os.environ.get("RANK", "0")) == 0:
        stage_logger().info(f"train: {note}")
    if eval_dataset is not None and patience:
        from transformers import EarlyStoppingCallback

        callbacks.append(EarlyStoppingCallback(early_stopping_patience=patience))
    from transformers import set_seed

    # The new adapter's initial weights are drawn here, before the Trainer seeds itself: seeded, the same
    # config trains the same model whatever this process did before (a test suite, a benchmark, a long server)
    set_seed(local.seed)
    trainer = SFTTrainer(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=tokenizer, peft_config=None if init_adapter is not None else lora,
                         callbacks=callbacks)
    trainer.remove_callback(PrinterCallback)  # our progress log says the same, once, in the run log
    return trainer, tokenizer, base_source



def loss_curve_png(history: list[tuple[int, float]], path: Path) -> Path | None:
    if not history:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in history], [loss for _, loss in history], marker=".")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title("LoRA fine-tuning loss")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path



def untrained_adapter(exported: ExportedDataset, train: TrainConfig, models_dir: Path, out_dir: Path,
                       init_adapter: Path | None = None) -> LocalAdapter:
    """No training asked for: the adapter is LoRA's initialisation (which leaves the base unchanged), or on a
    warm start the adapter it would have continued."""
    from peft import LoraConfig, get_peft_model

    local, started = train.local, time.perf_counter()
    quiet_libraries()
    base_source = resolve_base_model(train, models_dir, stage_logger())
    adapter_dir = out_dir / "adapter"
    if init_adapter is not None:
        import shutil

        shutil.copytree(init_adapter, adapter_dir, dirs_exist_ok=True)
    else:
        lora = LoraConfig(r=local.lora.r, lora_alpha=local.lora.alpha, lora_dropout=local.lora.dropout,
                          target_modules=local.lora.target_modules, task_type="CAUSAL_LM")
        get_peft_model(load_causal_lm(base_source), lora).save_pretrained(adapter_dir)
    load_tokenizer(base_source).save_pretrained(adapter_dir)
    return LocalAdapter(base_model=str(base_source), adapter_path=adapter_dir,
                        dataset_version=exported.dataset_version, steps=0, train_loss=None,
                        train_seconds=round(time.perf_counter() - started, 2))



def progress_every(local) -> int:
    """How many steps apart the run log prints progress: ``progress_every``, or a tenth of a short run."""
    return max(1, local.progress_every if local.max_steps is None else min(local.progress_every, local.max_steps // 10))


def _progress_callback(log, started: float, start_step: int, every: int = 1):
    """Step, loss, tokens/s and ETA in the run log every ``every`` steps and at the last one (the loss itself is
    logged every step); a live bar too when a person is watching."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        bar = None

        def on_train_begin(self, args, state, control, **kwargs):
            if sys.stderr.isatty() and state.is_world_process_zero:
                from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

                self.bar = Progress(TextColumn("train"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                                    TextColumn("loss {task.fields[loss]}"), TimeRemainingColumn(), transient=True)
                self.task = self.bar.add_task("train", total=state.max_steps, completed=start_step, loss="-")
                self.bar.start()

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar:
                self.bar.update(self.task, completed=state.global_step)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not logs or not state.is_world_process_zero:
                return
            total = max(state.max_steps, state.global_step)
            if "eval_loss" in logs:
                best = state.best_metric if state.best_metric is not None else logs["eval_loss"]
                log.info(f"train: step {state.global_step}/{total} validation loss {logs['eval_loss']:.4f} "
                         f"(best {min(best, logs['eval_loss']):.4f})")
                return
            if "loss" not in logs:
                return
            if self.bar:
                self.bar.update(self.task, loss=f"{logs['loss']:.4f}")
            if state.global_step % every and state.global_step < total:
                return
            elapsed = max(time.perf_counter() - started, 1e-9)
            rate = (state.global_step - start_step) / elapsed
            eta = max(0.0, (total - state.global_step) / max(rate, 1e-9))
            tokens = int(getattr(state, "num_input_tokens_seen", 0) or 0)
            log.info(f"train: step {state.global_step}/{total} (epoch {state.epoch or 0:.2f}) loss {logs['loss']:.4f} "
                     f"({tokens / elapsed:,.0f} tokens/s, ETA {eta:.0f}s)")

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar:
                self.bar.stop()

    return Progress()



def train_here(exported: ExportedDataset, train: TrainConfig, models_dir: Path, out_dir: Path,
                checkpoint_dir: Path, init_adapter: Path | None = None,
                resume: Path | None = None) -> LocalAdapter | None:
    """Train in this process (one device, or one rank under torchrun), on from ``resume`` (a whole checkpoint,
    see ``last_complete_checkpoint``); only rank 0 saves and reports."""
    local = train.local
    log = stage_logger()
    adapter_dir = out_dir / "adapter"
    started = time.perf_counter()
    start_step = step_of(resume) if resume else 0
    trainer, tokenizer, base_source = build_trainer(exported, train, models_dir, checkpoint_dir,
                                                    [_progress_callback(log, started, start_step, progress_every(local))], init_adapter)
    train_loss = None
    if resume and training_ended(resume) and take_ended_checkpoint(trainer, resume):
        if trainer.is_world_process_zero():
            log.info(f"train: {resume.name} is where this training ended (step {start_step}), but it was not marked "
                     "finished: taking it as the result, with no step more")
    else:
        if resume and trainer.is_world_process_zero():
            log.info(f"train: resuming from {resume} (step {start_step})")
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        train_loss = float(result.training_loss)
    trained_steps = trainer.state.global_step - start_step
    selection = _selection(trainer)
    if selection and trainer.is_world_process_zero():
        log.info(selection.pop("message"))
    if local.devices > 1:
        _record_rank(trainer, out_dir / "training")
    fsdp = bool(getattr(trainer, "is_fsdp_enabled", False)) and trained_steps > 0  # else: not sharded
    if fsdp:
        trainer.accelerator.state.fsdp_plugin.set_state_dict_type("FULL_STATE_DICT")
        trainer.save_model(str(adapter_dir))  # gathers the shards of the adapter onto rank 0
    if not trainer.is_world_process_zero():
        return None
    seconds = time.perf_counter() - started
    history = [(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e]
    if not fsdp:
        trainer.model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    training_dir = out_dir / "training"
    training_dir.mkdir(exist_ok=True)
    loss_curve_png(history, training_dir / "loss_curve.png")
    tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    evals = [(int(e["step"]), float(e["eval_loss"])) for e in trainer.state.log_history if "eval_loss" in e]
    step_metrics = {"eval_loss": evals} if evals else {}
    if selection:
        step_metrics["best_eval_loss"] = [(selection["best_step"], selection["best_eval_loss"])]
    return LocalAdapter(
        base_model=str(base_source),
        adapter_path=adapter_dir,
        artifacts_dir=training_dir,
        dataset_version=exported.dataset_version,
        steps=trainer.state.global_step,
        epochs=round(float(trainer.state.epoch or 0), 3),
        step_metrics=step_metrics,
        best_step=selection.get("best_step"),
        stopped_early=selection.get("stopped_early", False),
        train_loss=history[-1][1] if history else None,
        mean_train_loss=train_loss if trained_steps > 0 else None,
        loss_history=history,
        train_seconds=round(seconds, 2),
        resumed_from_step=start_step,
        tokens_per_second=round(tokens / seconds, 1) if tokens and trained_steps > 0 else None,
        peak_memory_mb=_peak_memory_mb(),
        devices=local.devices,
    )



def _selection(trainer) -> dict:
    """Which checkpoint was kept and why, from the trainer's state after training (empty without validation)."""
    state = trainer.state
    if state.best_metric is None or not state.best_model_checkpoint:
        return {}
    best_step = int(Path(state.best_model_checkpoint).name.rsplit("-", 1)[1])
    planned = state.max_steps
    stopped_early = state.global_step < planned
    why = (f"stopped early at step {state.global_step} of {planned}: the validation loss had not improved for "
           f"{_patience(trainer)} evaluations") if stopped_early else \
        f"trained all {planned} steps"
    return {"best_step": best_step, "best_eval_loss": float(state.best_metric), "stopped_early": stopped_early,
            "message": f"train: {why}; kept the checkpoint of step {best_step} (validation loss "
                       f"{state.best_metric:.4f})"}



def _patience(trainer) -> int:
    from transformers import EarlyStoppingCallback

    found = [c for c in trainer.callback_handler.callbacks if isinstance(c, EarlyStoppingCallback)]
    return found[0].early_stopping_patience if found else 0



def _record_rank(trainer, training_dir: Path) -> None:
    """Each rank says what it trained on (the first batch of its shard), so a test can see both ranks worked."""
    import torch.distributed as dist

    batch = next(iter(trainer.get_train_dataloader()))
    training_dir.mkdir(parents=True, exist_ok=True)
    rank = dist.get_rank()
    (training_dir / f"rank-{rank}.json").write_bytes(orjson.dumps({
        "rank": rank, "world_size": dist.get_world_size(), "global_step": trainer.state.global_step,
        "backend": dist.get_backend(),
        "first_batch_sha256": hashlib.sha256(batch["input_ids"].cpu().numpy().tobytes()).hexdigest(),
    }))
