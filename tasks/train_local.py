"""Local backend: LoRA supervised fine-tuning with TRL's SFTTrainer on the exported chat JSONL.

Loss is on assistant tokens only (the chat template marks them with generation blocks), so the model
learns to answer, not to echo tickets. On a machine without CUDA it trains in fp32 on the CPU; bf16 where
the GPU supports it. Checkpoints go to a folder keyed by (dataset version, training config), so a rerun
after a crash resumes from the last one instead of step 0, and a rerun of finished training is instant.
"""

from __future__ import annotations

import hashlib
import resource
import sys
import time
from pathlib import Path

import orjson
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.config import TrainConfig
from tasks.base_model import load_causal_lm, load_tokenizer, quiet_libraries, resolve_base_model
from tasks.records import ExportedDataset, TrainedModel, TuneloopError
from tasks.state import stage_logger


def _read_messages(path: Path) -> list[dict]:
    with path.open("rb") as fh:
        return [{"messages": orjson.loads(line)["messages"]} for line in fh if line.strip()]


def checkpoint_key(exported: ExportedDataset, train: TrainConfig) -> str:
    """Same data, same base, same settings: the same training, so its checkpoints can be resumed."""
    settings = train.model_dump_json(include={"base_model", "tiny", "local"})
    return f"{exported.dataset_version}-{hashlib.sha256(settings.encode()).hexdigest()[:12]}"


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


def build_trainer(exported: ExportedDataset, train: TrainConfig, models_dir: Path, checkpoint_dir: Path,
                  callbacks: list | None = None):
    """The SFTTrainer for this export and config (a test inspects its batches without training)."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import PrinterCallback
    from trl import SFTConfig, SFTTrainer

    local = train.local
    quiet_libraries()
    load_kwargs = _check_quantization(train)
    base_source = resolve_base_model(train, models_dir)
    tokenizer = load_tokenizer(base_source)
    model = load_causal_lm(base_source, **load_kwargs)
    lora = LoraConfig(r=local.lora.r, lora_alpha=local.lora.alpha, lora_dropout=local.lora.dropout,
                      target_modules=local.lora.target_modules, task_type="CAUSAL_LM")
    use_cuda = torch.cuda.is_available()
    args = SFTConfig(
        output_dir=str(checkpoint_dir),
        max_steps=local.max_steps,
        per_device_train_batch_size=local.batch_size,
        learning_rate=local.learning_rate,
        warmup_steps=min(local.warmup_steps, local.max_steps),
        lr_scheduler_type="cosine",
        logging_steps=max(1, min(25, local.max_steps // 10)),
        max_length=local.max_length,
        assistant_only_loss=True,
        seed=local.seed,
        use_cpu=not use_cuda,
        bf16=use_cuda and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=local.gradient_checkpointing,
        save_strategy="steps",
        save_steps=local.checkpoint_every,
        save_total_limit=2,
        include_num_input_tokens_seen="non_padding",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
    )
    dataset = Dataset.from_list(_read_messages(exported.train_path))
    if len(dataset) == 0:
        raise TuneloopError(f"train: {exported.train_path} holds no examples")
    trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora, callbacks=callbacks or [])
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


def train_lora(exported: ExportedDataset, train: TrainConfig, models_dir: Path, out_dir: Path,
               checkpoints_dir: Path | None = None) -> TrainedModel:
    from peft import get_peft_model
    from transformers import TrainerCallback
    from transformers.trainer_utils import get_last_checkpoint

    local = train.local
    log = stage_logger()
    adapter_dir = out_dir / "adapter"
    started = time.perf_counter()
    out_dir.mkdir(parents=True, exist_ok=True)

    if local.max_steps == 0:
        # No training asked for: the adapter is LoRA's initialisation, which leaves the base unchanged.
        from peft import LoraConfig

        quiet_libraries()
        base_source = resolve_base_model(train, models_dir)
        lora = LoraConfig(r=local.lora.r, lora_alpha=local.lora.alpha, lora_dropout=local.lora.dropout,
                          target_modules=local.lora.target_modules, task_type="CAUSAL_LM")
        get_peft_model(load_causal_lm(base_source), lora).save_pretrained(adapter_dir)
        load_tokenizer(base_source).save_pretrained(adapter_dir)
        return TrainedModel(backend="local", base_model=str(base_source), adapter_path=adapter_dir,
                            dataset_version=exported.dataset_version, steps=0, train_loss=None,
                            train_seconds=round(time.perf_counter() - started, 2))

    checkpoint_dir = (checkpoints_dir or out_dir / "checkpoints") / checkpoint_key(exported, train)
    resume = get_last_checkpoint(str(checkpoint_dir)) if checkpoint_dir.is_dir() else None

    class ProgressLog(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                done = state.global_step - (start_step or 0)
                rate = done / max(time.perf_counter() - started, 1e-9)
                eta = (state.max_steps - state.global_step) / max(rate, 1e-9)
                log.info(f"train: step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}"
                         f" ({rate:.1f} steps/s, ETA {eta:.0f}s)")

    start_step = int(Path(resume).name.rsplit("-", 1)[1]) if resume else 0
    trainer, tokenizer, base_source = build_trainer(exported, train, models_dir, checkpoint_dir, [ProgressLog()])
    if resume:
        log.info(f"train: resuming from {resume} (step {start_step} of {local.max_steps})")
    result = trainer.train(resume_from_checkpoint=resume)
    seconds = time.perf_counter() - started
    history = [(int(e["step"]), float(e["loss"])) for e in trainer.state.log_history if "loss" in e]
    trainer.model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    training_dir = out_dir / "training"
    training_dir.mkdir(exist_ok=True)
    loss_curve_png(history, training_dir / "loss_curve.png")
    tokens = int(getattr(trainer.state, "num_input_tokens_seen", 0) or 0)
    trained_steps = result.global_step - start_step
    return TrainedModel(
        backend="local",
        base_model=str(base_source),
        adapter_path=adapter_dir,
        artifacts_dir=training_dir,
        dataset_version=exported.dataset_version,
        steps=local.max_steps,
        train_loss=float(result.training_loss) if trained_steps > 0 else (history[-1][1] if history else None),
        loss_history=history,
        train_seconds=round(seconds, 2),
        resumed_from_step=start_step,
        tokens_per_second=round(tokens / seconds, 1) if tokens and trained_steps > 0 else None,
        peak_memory_mb=_peak_memory_mb(),
    )


@task(name="train", cache_policy=NO_CACHE)
def train_task(exported: ExportedDataset, train: TrainConfig, models_dir: Path, out_dir: Path,
               checkpoints_dir: Path | None = None) -> TrainedModel:
    trained = train_lora(exported, train, models_dir, out_dir, checkpoints_dir)
    resumed = f" (resumed from step {trained.resumed_from_step})" if trained.resumed_from_step else ""
    get_run_logger().info(f"train: {trained.steps} steps in {trained.train_seconds:.1f}s{resumed}, final loss "
                          f"{trained.train_loss}, {trained.tokens_per_second} tokens/s, peak {trained.peak_memory_mb} MB")
    return trained
