"""Benchmark: does more data make the default retrain better, on data tuneloop was not written for?

Pinecrest Home's product reviews (data/generate_reviews.py: other field names, ten departments, a reply)
land in two batches: 2,000 records, then 1,000 more. The pipeline comes from `tuneloop init` on the first
batch (no hand-written config or suite). Each setting runs the loop twice in a fresh state folder, once per
batch, exactly as a user would (`tuneloop run`, separate processes), and reads the candidate's held-out
accuracy from MLflow after each run. Several training seeds give the noise: a second-batch score is "as
good" when it is at least the first batch's minus the largest seed-to-seed spread seen in this run.

Settings, in the same run:
  * ``epochs`` (the default): a fresh adapter, 3 epochs, validation loss, best checkpoint, early stopping;
  * ``epochs, init_from champion``: the same budget, continuing the champion's adapter;
  * ``fixed 300 steps`` (the baseline: the old default budget): a fresh adapter, max_steps 300 whatever the
    data's size, no early stopping.

    .venv/bin/python bench/own_data.py [--seeds 0 1] [--other-seeds 0] [--settings default champion fixed]
        [--batch1 2000] [--batch2 1000]

Prints a table, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SETTINGS = {
    "default": ("epochs (default)", []),
    "champion": ("epochs, init_from champion", ["train.local.init_from=champion"]),
    "fixed": ("fixed 300 steps (old default)", ["train.local.max_steps=300", "train.local.early_stopping_patience=null"]),
}


def tuneloop(*args: str, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "TUNELOOP_HOME": str(home)}
    out = subprocess.run([str(BIN / "tuneloop"), *args], env=env, capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"tuneloop {' '.join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return out


def candidate_metrics(home: Path) -> dict:
    """The newest run's candidate accuracy, steps and promotion, from the home's MLflow store."""
    from mlflow.tracking import MlflowClient

    from tuneloop.core.state import StateLayout

    client = MlflowClient(StateLayout(home).tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time DESC"],
                              max_results=1)
    run = runs[0]
    m, tags = run.data.metrics, run.data.tags
    return {"accuracy": m.get("eval/candidate_accuracy"), "promoted": tags.get("promoted") == "true",
            "train_seconds": m.get("train/seconds"), "best_eval_loss": m.get("loss/best_eval"),
            "n_train": int(m.get("records/n_train", 0))}


def run_setting(work: Path, config: Path, batches: list[Path], overrides: list[str], seed: int) -> list[dict]:
    # a home of its own per setting and seed: MLflow caches its store per URI in this process, so a deleted and
    # recreated mlflow.db at the same path would still be read through the old (unlinked) file
    home = work / f"home-seed-{seed}"
    landing = home / "landing"
    landing.mkdir(parents=True)
    sets = [x for o in [*overrides, f"train.local.seed={seed}", f"source.landing={landing}"] for x in ("--set", o)]
    results = []
    for batch in batches:
        shutil.copy(batch, landing / (batch.name + ".part"))
        (landing / (batch.name + ".part")).rename(landing / batch.name)
        started = time.perf_counter()
        tuneloop("run", "--config", str(config), *sets, home=home)
        results.append({**candidate_metrics(home), "seconds": round(time.perf_counter() - started, 1)})
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds of the default setting")
    parser.add_argument("--other-seeds", type=int, nargs="+", default=[0], help="training seeds of the other settings")
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--batch1", type=int, default=2000)
    parser.add_argument("--batch2", type=int, default=1000)
    args = parser.parse_args()
    os.environ.setdefault("MLFLOW_ENABLE_TELEMETRY", "false")
    sys.path.insert(0, str(ROOT / "data"))
    from generate_reviews import generate

    with tempfile.TemporaryDirectory(prefix="tuneloop-own-data-") as tmp:
        work = Path(tmp)
        data = generate(work / "data", args.batch1, args.batch2)
        tuneloop("init", str(data["batch-1"]), "--out", str(work / "pipeline"), home=work / "init-home")
        config = work / "pipeline" / "tuneloop.yaml"
        rows = {}
        for key in args.settings:
            name, overrides = SETTINGS[key]
            seeds = args.seeds if key == "default" else args.other_seeds
            rows[key] = [run_setting(work / key, config, [data["batch-1"], data["batch-2"]], overrides, s)
                         for s in seeds]
            print(f"{name}: " + "; ".join(f"seed {s}: {r[0]['accuracy']:.3f} -> {r[1]['accuracy']:.3f}"
                                          for s, r in zip(seeds, rows[key], strict=True)), file=sys.stderr, flush=True)

    # noise: the largest spread between seeds of the same setting and batch
    spreads = [max(r[b]["accuracy"] for r in runs) - min(r[b]["accuracy"] for r in runs)
               for runs in rows.values() if len(runs) > 1 for b in (0, 1)]
    noise = max(spreads, default=0.0)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"held-out accuracy after batch 1 ({args.batch1}) and batch 1+2 ({args.batch1 + args.batch2}); "
                        f"mean over seeds (default: {len(args.seeds)}, others: {len(args.other_seeds)})")
    for col in ("setting", "batch 1", "batch 1+2", "change", "as good (within noise)", "train s (b1, b2)"):
        table.add_column(col, justify="right")
    figures = {}
    for key, runs in rows.items():
        first = statistics.mean(r[0]["accuracy"] for r in runs)
        second = statistics.mean(r[1]["accuracy"] for r in runs)
        ok = second >= first - noise
        figures[key] = {"setting": SETTINGS[key][0], "batch1_accuracy": round(first, 4),
                        "batch12_accuracy": round(second, 4), "as_good": ok,
                        "per_seed": [[r[0]["accuracy"], r[1]["accuracy"]] for r in runs],
                        "train_seconds": [[r[0]["train_seconds"], r[1]["train_seconds"]] for r in runs]}
        secs = ", ".join(f"{statistics.mean(r[b]['train_seconds'] for r in runs):.0f}" for b in (0, 1))
        table.add_row(SETTINGS[key][0], f"{first:.3f}", f"{second:.3f}", f"{second - first:+.3f}",
                      "yes" if ok else "NO", secs)
    Console(width=120).print(table)
    print(f"noise: largest seed-to-seed spread of one setting and batch = {noise:.3f}")
    print(json.dumps({"benchmark": "own_data_two_batches", "baseline": "fixed 300 steps (old default)",
                      "dataset": "data/generate_reviews.py", "batches": [args.batch1, args.batch2],
                      "seeds": args.seeds, "other_seeds": args.other_seeds, "noise": round(noise, 4),
                      "settings": figures, "machine": f"{platform.machine()}, {os.cpu_count()} cpus"}))


if __name__ == "__main__":
    main()
