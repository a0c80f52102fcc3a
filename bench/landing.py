"""Benchmark: from a landing file's completion to the start of the retrain flow run it triggers.

A real Prefect server (started here, SQLite in a temp folder), `tuneloop serve` and `tuneloop watch` as
separate processes, as a user runs them. Each trial renames a small file into the landing folder (the moment
it is complete), then reads the triggered run's start time from the server; the next trial waits until that
run has finished (a landing during a run is queued by design, which is not latency).

Baseline (named ``prefect_default_poll``), in the same run: the same setup with the runner's default poll
interval (10 s) instead of tuneloop's 1 s, to show where the time goes.

    .venv/bin/python bench/landing.py [--trials 5]

Prints a table, then one JSON line with the figures. Target: at most 10 s, every trial.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from services import BIN, PrefectServer, wait_until  # noqa: E402

SETS = ["train.local.max_steps=0", "evaluate.max_examples=10", "schedule.retrain_cron=null",
        "schedule.drift_cron=null", "schedule.poll_seconds=0.5", "quality.min_examples=1"]


def runs(server: PrefectServer) -> list:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    async def read():
        async with get_client() as client:
            return await client.read_flow_runs(deployment_filter=DeploymentFilter(
                name=DeploymentFilterName(any_=["retrain"])))

    with server.client_settings():
        return asyncio.run(read())


def trial_set(root: Path, query_seconds: float, trials: int, lines: list[str]) -> list[dict]:
    server = PrefectServer(root / "prefect")
    home = root / "home"
    (home / "landing").mkdir(parents=True)
    sets = [x for s in SETS + [f"register.tracking_uri=sqlite:///{root / 'mlflow.db'}"] for x in ("--set", s)]
    config = str(ROOT / "deployments" / "demo.yaml")
    env = {"TUNELOOP_HOME": str(home)}
    results = []
    try:
        server.start()
        serve = server.spawn([str(BIN / "tuneloop"), "serve", "--no-watch", "--query-seconds", str(query_seconds),
                              "--config", config, *sets], "serve.log", env=env, cwd=ROOT)
        wait_until(lambda: serve.poll() is None and "retrain" in server.cli("deployment", "ls"), 120, "deployments")
        server.spawn([str(BIN / "tuneloop"), "watch", "--config", config, *sets], "watch.log", env=env, cwd=ROOT)
        time.sleep(3)  # the watcher's first poll
        for i in range(trials):
            part = home / "landing" / f"batch-{i}.jsonl.part"
            part.write_text("".join(lines[i * 20:(i + 1) * 20]))
            part.rename(part.with_suffix(""))
            complete = time.time()
            run = wait_until(lambda c=complete: next((r for r in runs(server) if r.start_time and
                                           r.start_time.timestamp() >= c - 1), None), 120, "the triggered run")
            results.append({"trial": i, "seconds_to_start": round(run.start_time.timestamp() - complete, 2),
                            "seconds_to_created": round(run.created.timestamp() - complete, 2)})
            wait_until(lambda: all(r.state and r.state.is_final() for r in runs(server)), 300, "the run to finish")
    finally:
        server.stop()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--trials", type=int, default=5)
    args = parser.parse_args()
    from rich.console import Console
    from rich.table import Table

    os.environ.setdefault("DO_NOT_TRACK", "true")
    lines = [x for x in (ROOT / "data" / "demo" / "tickets.jsonl").read_text().splitlines(True)
             if '"queue": "' in x][: args.trials * 20]
    work = Path(tempfile.mkdtemp(prefix="tuneloop-bench-landing-"))
    figures = {}
    for name, query in (("tuneloop", 1.0), ("prefect_default_poll", 10.0)):
        figures[name] = trial_set(work / name, query, args.trials, lines)

    table = Table(title="landing file complete -> triggered retrain flow run started (seconds)")
    for col in ("setup", "runner poll", "run created (median)", "run started: median", "max"):
        table.add_column(col, justify="right")
    summary = {}
    for name, poll in (("tuneloop", 1.0), ("prefect_default_poll", 10.0)):
        starts = [r["seconds_to_start"] for r in figures[name]]
        created = [r["seconds_to_created"] for r in figures[name]]
        summary[name] = {"median_s": round(statistics.median(starts), 2), "max_s": max(starts),
                         "created_median_s": round(statistics.median(created), 2), "trials": figures[name]}
        table.add_row(name, f"{poll:g} s", f"{statistics.median(created):.1f}", f"{statistics.median(starts):.1f}",
                      f"{max(starts):.1f}")
    Console(width=110).print(table)
    print(json.dumps({"benchmark": "landing_latency", "baseline": "prefect_default_poll (runner polls every 10 s)",
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}",
                      **summary, "targets": {"at_most_10s_every_trial": summary["tuneloop"]["max_s"] <= 10}}))


if __name__ == "__main__":
    main()
