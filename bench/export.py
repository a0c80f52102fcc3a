"""Benchmark: validate + count tokens + write chat JSONL, tuneloop's export vs OpenAI's published recipe.

Baseline (named ``openai_recipe``), in the same run on the same examples with the same encoding: what
OpenAI's chat data-preparation recipe does, single-threaded: ``json.loads`` per line, its format-error
loop over examples and messages, then ``num_tokens_from_messages`` per example (3 per message + the
encoded length of each value, +1 for a name, +3 per example), and ``json.dumps`` per line to write.

Ours: the real export stage (``tasks.export.export_chat_jsonl``) on a snapshot of the same examples:
stratified split, held-out check, every example validated, every token counted by tuneloop's counter
(quicktok, chunk by chunk on a second thread while the next chunk is parsed; ``--engine tiktoken`` for
tiktoken alone), orjson writing, manifest. Counts must equal the baseline's on every example; the script
exits 1 otherwise.

Both sides use OpenAI's real o200k_base (gpt-4o-mini's encoding), loaded offline by tuneloop (the
published file rebuilt from quicktok's ranks and checked against tiktoken's SHA-256).

    .venv/bin/python bench/export.py [--sizes 100000 1000000] [--workdir DIR] [--engine fastest|tiktoken]

Prints a table, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

WORDS = ("sync folder invoice plan upgrade Lumenfold desktop client conflict copy share link password reset"
         " two-factor phone laptop error 0x80070005 can't won't doesn't files photos backup restore version"
         " history trash billing refund annual monthly seat admin SSO SAML team workspace quota storage GB"
         " réglage fichier 同期 ファイル 42 1,024 3.5 !!! ... (see attached) https://lumenfold.example/help").split()
SYSTEM = "You are Lumenfold's help desk. Route the ticket to a queue and write the first reply."


def generate(path: Path, n: int, seed: int = 7) -> None:
    """Mixed lengths: 1-3 turns, each message 3 to ~400 words (log-normal), a shared system prompt."""
    if path.exists():
        return
    rng = random.Random(seed)
    queues = ["billing", "sync", "account", "sharing", "desktop", "mobile"]
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for i in range(n):
            msgs = [{"role": "system", "content": SYSTEM}]
            for _ in range(rng.choice((1, 1, 1, 2, 3))):
                for role in ("user", "assistant"):
                    k = max(3, min(400, int(rng.lognormvariate(3.2, 0.9))))
                    msgs.append({"role": role, "content": " ".join(rng.choices(WORDS, k=k))})
            row = {"messages": msgs, "label": rng.choice(queues), "record_id": str(i), "source": "bench.jsonl",
                   "line": i + 1, "content_hash": f"{i:064x}"}
            fh.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.rename(path)


def load_counter(workdir: Path, engine: str):
    """OpenAI's real o200k_base (gpt-4o-mini's encoding), offline: tuneloop's own loader, which rebuilds the
    published file from the ranks quicktok embeds and checks it against tiktoken's SHA-256."""
    from tuneloop.core.config import OpenAITrainConfig
    from tuneloop.lib.tokens import TiktokenCounter, openai_counter

    openai = OpenAITrainConfig()
    counter = openai_counter(openai.model, openai, workdir)
    return counter if engine == "fastest" else TiktokenCounter(counter.encoding)


def openai_recipe(path: Path, out: Path, encoding) -> tuple[float, list[int]]:
    """The recipe, as published (format checks, then num_tokens_from_messages), plus writing the file."""
    from collections import defaultdict

    t = time.perf_counter()
    with open(path, encoding="utf-8") as f:
        dataset = [json.loads(line) for line in f]
    format_errors: dict[str, int] = defaultdict(int)
    for ex in dataset:
        if not isinstance(ex, dict):
            format_errors["data_type"] += 1
            continue
        messages = ex.get("messages", None)
        if not messages:
            format_errors["missing_messages_list"] += 1
            continue
        for message in messages:
            if "role" not in message or "content" not in message:
                format_errors["message_missing_key"] += 1
            if any(k not in ("role", "content", "name", "function_call", "weight") for k in message):
                format_errors["message_unrecognized_key"] += 1
            if message.get("role", None) not in ("system", "user", "assistant", "function"):
                format_errors["unrecognized_role"] += 1
            content = message.get("content", None)
            function_call = message.get("function_call", None)
            if (not content and not function_call) or not isinstance(content, str):
                format_errors["missing_content"] += 1
        if not any(message.get("role", None) == "assistant" for message in messages):
            format_errors["example_missing_assistant_message"] += 1

    def num_tokens_from_messages(messages, tokens_per_message=3, tokens_per_name=1):
        num_tokens = 0
        for message in messages:
            num_tokens += tokens_per_message
            for key, value in message.items():
                num_tokens += len(encoding.encode(value))
                if key == "name":
                    num_tokens += tokens_per_name
        num_tokens += 3
        return num_tokens

    counts = [num_tokens_from_messages(ex["messages"]) for ex in dataset]
    with open(out, "w", encoding="utf-8") as f:
        for ex in dataset:
            f.write(json.dumps({"messages": ex["messages"]}) + "\n")
    return time.perf_counter() - t, counts


def ours(path: Path, workdir: Path, counter) -> tuple[float, list[int], dict]:
    import orjson

    from tuneloop.core.config import ExportConfig, OpenAITrainConfig
    from tuneloop.core.records import DatasetVersion
    from tuneloop.tasks.export import TokenPlan, export_chat_jsonl

    openai = OpenAITrainConfig()
    plan = TokenPlan(counter=counter, limit=openai.spec().context_tokens, openai=openai, model=openai.model)
    exports = Path(tempfile.mkdtemp(dir=workdir))
    dataset = DatasetVersion(version=f"bench{path.stat().st_size}", path=path, n_examples=0)
    t = time.perf_counter()
    exported = export_chat_jsonl(dataset, ExportConfig(validation_fraction=0.1), [], exports, plan)
    seconds = time.perf_counter() - t
    # Per-example counts for the parity check, in the exported order (outside the timing).
    rows = [orjson.loads(line) for p in (exported.train_path, exported.validation_path) for line in p.open("rb")]
    recount = counter.count([r["messages"] for r in rows])
    return seconds, recount, {"estimate": exported.estimate, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tuneloop-bench-export")
    parser.add_argument("--engine", choices=["fastest", "tiktoken"], default="fastest",
                        help="tuneloop's encoder: the fastest exact one (default) or tiktoken alone")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    counter = load_counter(args.workdir, args.engine)
    encoding = counter.encoding

    from rich.console import Console
    from rich.table import Table

    results = []
    for n in args.sizes:
        path = args.workdir / f"chat-{n}.jsonl"
        generate(path, n)
        base_s, base_counts = openai_recipe(path, args.workdir / "recipe-out.jsonl", encoding)
        our_s, our_counts, extra = ours(path, args.workdir, counter)
        # parity: same multiset of (example, count) pairs, whatever the split order
        by_id_base = {str(i): c for i, c in enumerate(base_counts)}
        with open(path, "rb") as fh:
            import orjson

            key = {orjson.dumps(orjson.loads(line)["messages"]): str(i) for i, line in enumerate(fh)}
        mismatches = sum(by_id_base[key[orjson.dumps(r["messages"])]] != c for r, c in zip(extra["rows"], our_counts, strict=True))
        results.append({
            "examples": n, "tokens": sum(base_counts),
            "baseline_openai_recipe_s": round(base_s, 2), "baseline_examples_per_s": round(n / base_s),
            "tuneloop_export_s": round(our_s, 2), "tuneloop_examples_per_s": round(n / our_s),
            "speedup": round(base_s / our_s, 2), "count_mismatches": mismatches,
            "estimated_cost_usd_gpt_4o_mini": extra["estimate"].estimated_cost_usd,
        })
        del extra

    table = Table(title="validate + count tokens + write: tuneloop export vs OpenAI's recipe (same data, same encoding)")
    for col in ("examples", "tokens", "recipe s", "recipe ex/s", "tuneloop s", "tuneloop ex/s", "speedup", "count mismatches"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(f"{r['examples']:,}", f"{r['tokens']:,}", f"{r['baseline_openai_recipe_s']:.1f}",
                      f"{r['baseline_examples_per_s']:,}", f"{r['tuneloop_export_s']:.1f}",
                      f"{r['tuneloop_examples_per_s']:,}", f"{r['speedup']:.2f}x", str(r["count_mismatches"]))
    Console().print(table)
    ok = all(r["count_mismatches"] == 0 for r in results)
    print(json.dumps({"benchmark": "export", "baseline": "openai_recipe (json + format loop + num_tokens_from_messages)",
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                      "results": results, "targets": {"speedup_at_least_3x": all(r["speedup"] >= 3 for r in results),
                                                      "counts_identical": ok}}))
    if not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
