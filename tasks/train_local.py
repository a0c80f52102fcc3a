"""Local backend: LoRA supervised fine-tuning with TRL's SFTTrainer on the exported chat JSONL.

Loss is on assistant tokens only (the chat template marks them with generation blocks), so the model
learns to answer, not to echo tickets. On a machine without CUDA it trains in fp32 on the CPU.
"""

from __future__ import annotations

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


def train_lora(exported: ExportedDataset, train: TrainConfig, models_dir: Path, out_dir: Path) -> TrainedModel:
    import torch
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import PrinterCallback, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    local = train.local
    log = stage_logger()
    quiet_libraries()
    base_source = resolve_base_model(train, models_dir)
    tokenizer = load_tokenizer(base_source)
    model = load_causal_lm(base_source)
    lora = LoraConfig(
        r=local.lora.r, lora_alpha=local.lora.alpha, lora_dropout=local.lora.dropout,
        target_modules=local.lora.target_modules, task_type="CAUSAL_LM",
    )
    adapter_dir = out_dir / "adapter"
    started = time.perf_counter()
    history: list[tuple[int, float]] = []
    final_loss: float | None = None

    if local.max_steps == 0:
        # No training asked for: the adapter is LoRA's initialisation, which leaves the base unchanged.
        get_peft_model(model, lora).save_pretrained(adapter_dir)
    else:
        use_cuda = torch.cuda.is_available()

        class ProgressLog(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kwargs):
                if logs and "loss" in logs:
                    history.append((state.global_step, float(logs["loss"])))
                    rate = state.global_step / max(time.perf_counter() - started, 1e-9)
                    eta = (state.max_steps - state.global_step) / max(rate, 1e-9)
                    log.info(f"train: step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}"
                          f" ({rate:.1f} steps/s, ETA {eta:.0f}s)")

        args = SFTConfig(
            output_dir=str(out_dir / "trainer"),
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
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            dataloader_num_workers=0,
        )
        dataset = Dataset.from_list(_read_messages(exported.train_path))
        if len(dataset) == 0:
            raise TuneloopError(f"train: {exported.train_path} holds no examples")
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=lora, callbacks=[ProgressLog()])
        trainer.remove_callback(PrinterCallback)  # our ProgressLog says the same, once, in the run log
        result = trainer.train()
        final_loss = float(result.training_loss)
        trainer.model.save_pretrained(adapter_dir)
    tokenizer.save_pretrained(adapter_dir)
    return TrainedModel(
        backend="local",
        base_model=str(base_source),
        adapter_path=adapter_dir,
        dataset_version=exported.dataset_version,
        steps=local.max_steps,
        train_loss=final_loss,
        loss_history=history,
        train_seconds=round(time.perf_counter() - started, 2),
    )


@task(name="train", cache_policy=NO_CACHE)
def train_task(exported: ExportedDataset, train: TrainConfig, models_dir: Path, out_dir: Path) -> TrainedModel:
    trained = train_lora(exported, train, models_dir, out_dir)
    get_run_logger().info(f"train: {trained.steps} steps in {trained.train_seconds:.1f}s, final loss {trained.train_loss}")
    return trained
