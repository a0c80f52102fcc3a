"""Benchmark: LoRA SFT throughput, tuneloop's training configuration vs a plain padded Trainer.

Same model, same LoRA settings, same examples of mixed lengths (demo tickets as threads of 1 to 20
messages, log-normal: ~40 to well over max_length tokens),
one epoch each, each in its own process (so peak memory is its own):

- ``baseline_padded_trainer``: transformers ``Trainer`` on the peft model, every batch padded to
  ``max_length``, no packing: what a first LoRA script usually does.
- ``tuneloop``: the real ``tuneloop.lib.lora.build_trainer`` (TRL SFTTrainer, best-fit packing into
  padding-free rows of ``max_length`` tokens, loss on assistant tokens), same token slots per batch.

Throughput is non-padding tokens per second (both sides train on the same tokens). On CUDA the model is a
~0.5B-parameter Llama config with random weights (no download) in bf16 and the script also reports MFU:
tokens/s x FLOPs per token / peak bf16 FLOP/s, with FLOPs per token = 4 x frozen parameters (forward, and the
backward that only propagates activations through frozen weights) + 6 x LoRA parameters + attention.

    .venv/bin/python bench/train.py [--examples 384] [--max-length 512] [--peak-tflops 989]

Prints a table, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SYSTEM = "You are Lumenfold's help desk. Route the ticket to a queue and write the first reply."
DEMO = ROOT / "data" / "demo" / "tickets.jsonl"


def make_data(path: Path, n: int, seed: int = 3) -> None:
    """Demo tickets as threads of mixed length: 1 to ~20 messages of a customer's history (log-normal), the
    way exported support conversations look; the answer is the routing line and the first reply."""
    rng = random.Random(seed)
    tickets = []
    for line in DEMO.read_text().splitlines():  # the demo file has broken lines on purpose: skip them here
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if all(isinstance(row.get(k), str) and row[k] for k in ("subject", "body", "queue", "answer")):
            tickets.append(row)
    with path.open("w") as fh:
        for _ in range(n):
            first = rng.choice(tickets)
            k = max(1, min(20, int(rng.lognormvariate(0.7, 0.9))))
            thread = "\n\n> ".join(str(t["body"]) for t in [first, *rng.sample(tickets, k - 1)])
            fh.write(json.dumps({"messages": [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": f"Subject: {first['subject']}\n\n{thread}"},
                {"role": "assistant", "content": f"queue: {first['queue']}\n{first['answer']}"}]}) + "\n")


def build_model(workdir: Path, gpu: bool) -> Path:
    """A tokenizer trained on the bench words, and a random Llama: tiny on CPU, ~0.5B on a GPU."""
    from tuneloop.core.config import TinyBaseConfig
    from tuneloop.lib.base_model import build_tiny_model

    corpus = DEMO
    out = workdir / ("model-gpu" if gpu else "model-cpu")
    if out.is_dir():
        return out
    tiny = (TinyBaseConfig(corpus=[corpus], vocab_size=2048, hidden_size=1024, num_layers=24, num_heads=16,
                           max_position_embeddings=2048) if gpu else
            TinyBaseConfig(corpus=[corpus], vocab_size=1024, hidden_size=256, num_layers=4, num_heads=4,
                           max_position_embeddings=1024))
    build_tiny_model(tiny, out)
    if gpu:  # a 0.5B-class shape: Qwen2.5-0.5B-like width/depth with a Llama MLP
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.from_pretrained(out)
        cfg.intermediate_size = 4864
        AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def _peak_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_baseline(workdir: Path, model_dir: Path, max_length: int, batch: int) -> dict:
    import torch
    from datasets import Dataset
    from peft import get_peft_model
    from transformers import (
        AutoModelForCausalLM,
        AutoTokenizer,
        Trainer,
        TrainingArguments,
        default_data_collator,
    )

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows, real = [], 0
    for line in (workdir / "data.jsonl").read_text().splitlines():
        ids = tok.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=False)[:max_length]
        real += len(ids)
        pad = max_length - len(ids)
        rows.append({"input_ids": ids + [tok.pad_token_id] * pad, "attention_mask": [1] * len(ids) + [0] * pad,
                     "labels": ids + [-100] * pad})
    cuda = torch.cuda.is_available()
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.bfloat16 if cuda else torch.float32), _lora())
    args = TrainingArguments(output_dir=str(workdir / "baseline-out"), per_device_train_batch_size=batch,
                             num_train_epochs=1, learning_rate=2e-4, report_to=[], save_strategy="no",
                             logging_strategy="no", disable_tqdm=True, use_cpu=not cuda, bf16=cuda, seed=0,
                             dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=Dataset.from_list(rows),
                      data_collator=default_data_collator)
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {"tokens": real, "slots": len(rows) * max_length, "seconds": seconds, "steps": trainer.state.global_step,
            "peak_mb": _peak_mb()}


def run_ours(workdir: Path, model_dir: Path, max_length: int, batch: int) -> dict:
    from tuneloop.core.config import TrainConfig
    from tuneloop.core.records import ExportedDataset
    from tuneloop.lib.lora import build_trainer

    data = workdir / "data.jsonl"
    n = sum(1 for _ in data.open())
    exported = ExportedDataset(dataset_version="bench", directory=workdir, train_path=data, validation_path=data,
                               manifest_path=data, n_train=n, n_validation=0, sha256={})
    train = TrainConfig(base_model=str(model_dir), local={
        "max_steps": 10**6, "batch_size": batch, "learning_rate": 2e-4, "warmup_steps": 0, "max_length": max_length,
        "eval_every": 10**6, "early_stopping_patience": None, "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}})
    trainer, _, _ = build_trainer(exported, train, workdir, workdir / "ours-out")
    packed_rows = len(trainer.train_dataset)
    trainer.args.max_steps = math.ceil(packed_rows / batch)  # exactly one epoch over the packed rows
    trainer.args.logging_steps = 10**6
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    tokens = int(trainer.state.num_input_tokens_seen)
    return {"tokens": tokens, "slots": packed_rows * max_length, "seconds": seconds, "steps": trainer.state.global_step,
            "peak_mb": _peak_mb(), "packed_rows": packed_rows}


def flops_per_token(model_dir: Path, max_length: int) -> float:
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    model = get_peft_model(AutoModelForCausalLM.from_config(cfg), _lora())
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    frozen = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n and "embed_tokens" not in n)
    # attention scores and values: 2 matmuls of seq x head_dim per head, x3 for forward + backward
    attention = 3 * 2 * 2 * cfg.num_hidden_layers * cfg.hidden_size * max_length / 2  # causal: half on average
    return 4 * frozen + 6 * lora + attention


def child(which: str, workdir: Path, max_length: int, batch: int) -> None:
    from tuneloop.core.models import quiet_libraries

    quiet_libraries()
    model_dir = Path(os.environ["BENCH_MODEL"])
    fn = run_ours if which == "ours" else run_baseline
    print("RESULT " + json.dumps(fn(workdir, model_dir, max_length, batch)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=384)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8, help="rows per batch (both sides: same token slots)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak dense bf16 TFLOP/s (H100 SXM: 989)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", choices=["ours", "baseline"])
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.workdir, args.max_length, args.batch)

    import torch
    from rich.console import Console
    from rich.table import Table

    gpu = torch.cuda.is_available()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tuneloop-bench-train-"))
    workdir.mkdir(parents=True, exist_ok=True)
    make_data(workdir / "data.jsonl", args.examples)
    model_dir = build_model(workdir, gpu)
    env = {**os.environ, "BENCH_MODEL": str(model_dir), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "DO_NOT_TRACK": "true"}
    figures = {}
    for which in ("baseline", "ours"):
        done = subprocess.run([sys.executable, __file__, "--child", which, "--workdir", str(workdir), "--max-length",
                               str(args.max_length), "--batch", str(args.batch)], env=env, capture_output=True,
                              text=True)
        line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
        if done.returncode != 0 or line is None:
            sys.exit(f"bench/train.py: the {which} run failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
        r = json.loads(line[7:])
        r["tokens_per_s"] = r["tokens"] / r["seconds"]
        r["padding_share"] = 1 - r["tokens"] / r["slots"]
        figures[which] = r
    base, ours = figures["baseline"], figures["ours"]
    speedup = ours["tokens_per_s"] / base["tokens_per_s"]
    mfu = None
    if gpu:
        mfu = ours["tokens_per_s"] * flops_per_token(model_dir, args.max_length) / (args.peak_tflops * 1e12)

    table = Table(title=f"LoRA SFT, one epoch of {args.examples} mixed-length examples, max_length {args.max_length}, "
                        f"{args.batch} rows per batch ({'GPU bf16' if gpu else 'CPU fp32'})")
    for col in ("trainer", "steps", "padding", "non-padding tokens", "seconds", "tokens/s", "peak MB"):
        table.add_column(col, justify="right")
    for name, r in (("plain Trainer, padded to max_length", base), ("tuneloop (packed, padding-free)", ours)):
        table.add_row(name, str(r["steps"]), f"{r['padding_share']:.0%}", f"{r['tokens']:,}", f"{r['seconds']:.1f}",
                      f"{r['tokens_per_s']:,.0f}", f"{r['peak_mb']:,.0f}")
    console = Console(width=max(Console().width, 110))
    console.print(table)
    console.print(f"speedup {speedup:.2f}x" + (f", MFU {mfu:.1%}" if mfu is not None else ""))
    device = torch.cuda.get_device_name(0) if gpu else f"CPU {platform.machine()}, {os.cpu_count()} cores"
    print(json.dumps({
        "benchmark": "train", "baseline_name": "baseline_padded_trainer (transformers Trainer, pad to max_length, no packing)",
        "machine": f"{device}, torch {torch.__version__}, Python {platform.python_version()}",
        "examples": args.examples, "max_length": args.max_length, "rows_per_batch": args.batch,
        "baseline": {k: round(v, 3) if isinstance(v, float) else v for k, v in base.items()},
        "tuneloop": {k: round(v, 3) if isinstance(v, float) else v for k, v in ours.items()},
        "speedup_tokens_per_s": round(speedup, 2), "mfu": round(mfu, 4) if mfu is not None else None,
        "targets": {"speedup_at_least_2x_on_cpu": speedup >= 2 if not gpu else None,
                    "mfu_at_least_35pct_on_gpu": (mfu >= 0.35) if mfu is not None else None}}))


if __name__ == "__main__":
    main()
