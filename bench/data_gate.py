"""Benchmark: collect + quality gate on 100k and 1M synthetic tickets, against a bare pandas read.

Baseline, in the same run on the same files: ``pandas.read_json(path, lines=True)`` for every file
(no checks at all). Ours: the landing-folder source (content hashing, completeness rules) and the full
quality gate with the demo's config (PII scan and redaction, dedup, two Great Expectations suites,
quarantine, Data Docs). Each measurement runs in a fresh process, so peak RSS is its own.

Targets (issue: data gate): 1M records in under 60 s on 2 cores, within 3x the bare read's time at 1M, peak
RSS under 4 GB and not growing linearly with the record count.

    .venv/bin/python bench/data_gate.py [--sizes 100000 1000000] [--workdir DIR]

Prints a table, then one JSON line with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "data"))

RECORDS_PER_FILE = 100_000


def generate(folder: Path, n: int, seed: int = 11) -> None:
    """Demo-like tickets with ~1% of what real exports hold: empty bodies, PII, duplicates, broken lines."""
    from generate_demo import make_ticket

    folder.mkdir(parents=True, exist_ok=True)
    done = folder / ".complete"
    if done.exists():
        return
    rng = random.Random(seed)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    for f in range((n + RECORDS_PER_FILE - 1) // RECORDS_PER_FILE):
        lines = []
        for i in range(f * RECORDS_PER_FILE, min(n, (f + 1) * RECORDS_PER_FILE)):
            t = make_ticket(rng, i, start)
            roll = rng.random()
            if roll < 0.002:
                t["body"] = ""
            elif roll < 0.004:
                t["body"] += " Reach me at someone@example.com or +1 415 555 0134."
            elif roll < 0.005:
                t["queue"] = "unknown"
            lines.append(json.dumps(t))
            if roll > 0.997:
                lines.append(lines[-1])  # exact duplicate
        (folder / f"part-{f:04d}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    done.touch()


def worker(kind: str, folder: Path) -> dict:
    """One measurement, in this (fresh) process."""
    if kind == "pandas":
        import pandas as pd

        t = time.perf_counter()
        frames = [pd.read_json(p, lines=True) for p in sorted(folder.glob("*.jsonl"))]
        return {"seconds": time.perf_counter() - t, "records": sum(len(f) for f in frames)}

    t0 = time.perf_counter()
    import great_expectations  # noqa: F401  (import time reported separately)

    from tuneloop.core.config import DEFAULT_CONFIG, load_config
    from tuneloop.core.mapping import required_fields
    from tuneloop.lib.gate import check_batch
    from tuneloop.lib.ledger import Ledger
    from tuneloop.lib.sources import make_source

    imports = time.perf_counter() - t0
    cfg = load_config(DEFAULT_CONFIG)
    with tempfile.TemporaryDirectory() as run_dir:
        t = time.perf_counter()
        raw = make_source(cfg.source, folder, required_fields(cfg.mapping)).collect(Ledger())
        checked = check_batch(raw, cfg.source, cfg.mapping, cfg.quality, Path(run_dir))
        seconds = time.perf_counter() - t
    return {"seconds": seconds, "import_seconds": imports, "records": checked.n_read,
            "accepted": checked.n_accepted, "quarantined": checked.n_quarantined,
            "duplicates": checked.n_duplicates, "redacted": checked.n_redacted}


def measure(kind: str, folder: Path) -> dict:
    proc = subprocess.Popen([sys.executable, __file__, "--worker", kind, "--folder", str(folder)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "DO_NOT_TRACK": "true",
                                                                                   "GX_ANALYTICS_ENABLED": "false"})
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        raise SystemExit(f"{kind} worker failed with status {status}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["peak_rss_mb"] = round(usage.ru_maxrss / 1024, 1)  # Linux reports KiB
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "tuneloop-bench-data")
    parser.add_argument("--worker", choices=["pandas", "tuneloop"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.folder)))
        return

    from rich.console import Console
    from rich.table import Table

    rows = []
    for n in args.sizes:
        folder = args.workdir / f"tickets-{n}"
        generate(folder, n)
        base = measure("pandas", folder)
        ours = measure("tuneloop", folder)
        rows.append({
            "records": ours["records"], "files": len(list(folder.glob("*.jsonl"))),
            "baseline_pandas_read_json_s": round(base["seconds"], 2),
            "baseline_peak_rss_mb": base["peak_rss_mb"],
            "tuneloop_collect_gate_s": round(ours["seconds"], 2),
            "tuneloop_records_per_s": round(ours["records"] / ours["seconds"]),
            "tuneloop_peak_rss_mb": ours["peak_rss_mb"],
            "tuneloop_import_s": round(ours["import_seconds"], 2),
            "ratio_vs_baseline": round(ours["seconds"] / base["seconds"], 2),
            "accepted": ours["accepted"], "quarantined": ours["quarantined"], "duplicates": ours["duplicates"],
            "redacted": ours["redacted"],
        })

    table = Table(title="collect + quality gate vs bare pandas.read_json (same files, same run)")
    for col in ("records", "pandas read s", "pandas RSS MB", "tuneloop s", "records/s", "tuneloop RSS MB", "ratio"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(f"{r['records']:,}", f"{r['baseline_pandas_read_json_s']:.1f}", f"{r['baseline_peak_rss_mb']:.0f}",
                      f"{r['tuneloop_collect_gate_s']:.1f}", f"{r['tuneloop_records_per_s']:,}",
                      f"{r['tuneloop_peak_rss_mb']:.0f}", f"{r['ratio_vs_baseline']:.2f}x")
    Console().print(table)
    biggest = max(rows, key=lambda r: r["records"])
    smallest = min(rows, key=lambda r: r["records"])
    growth = biggest["tuneloop_peak_rss_mb"] / smallest["tuneloop_peak_rss_mb"]
    targets = {
        "under_60s_at_largest": biggest["tuneloop_collect_gate_s"] < 60,
        # at the largest size (the 1M): at 100k the fixed costs (starting the preparing process,
        # Great Expectations' per-run setup, Data Docs) are most of the time
        "within_3x_of_baseline_at_largest": biggest["ratio_vs_baseline"] <= 3,
        "peak_rss_under_4gb": all(r["tuneloop_peak_rss_mb"] < 4096 for r in rows),
        "rss_growth_vs_records_growth": round(growth / (biggest["records"] / smallest["records"]), 3),
    }
    print(json.dumps({"benchmark": "data_gate", "baseline": "pandas.read_json(lines=True)",
                      "machine": f"{platform.machine()}, {os.cpu_count()} cores, {platform.python_version()}",
                      "results": rows, "targets": targets}))


if __name__ == "__main__":
    main()
