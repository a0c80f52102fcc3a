"""The drift scenario: six weeks of Lumenfold tickets, a product launch at week 3, the loop reacting.

Each week, in the order the deployed triggers would start them: the week's file lands in the landing
folder; the drift monitor flow compares it with the champion's training data (and scores the champion on
it); the retrain flow trains on the grown dataset, continuing the champion's adapter (the scenario config
sets ``train.local.init_from: champion``), and the promotion gate decides. The trigger wiring
itself (watcher, events, one-at-a-time) is what tests/test_deployments.py runs against a real server; here
the same flows run in this process so the whole story takes minutes, not a week.

Before each week's retrain the script records what users met that week: the champion's accuracy on that
week's labeled tickets (held out, never trained on), and the accuracy the first champion would have had
if the loop had stopped after week 1 (the frozen model). The evaluation set of the promotion gate rolls
with the weeks (this week's and last week's held-out tickets), as a team's would.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

from pydantic import BaseModel

from tuneloop.core.config import load_config, packaged
from tuneloop.core.records import TuneloopError

SCENARIO_CONFIG = packaged("deployments", "drift-scenario.yaml")
# The scenario's data generator lives in the repository's data/ folder, not in the installed package.
REPO_ROOT = Path(__file__).resolve().parents[3]


class WeekOutcome(BaseModel):
    week: int
    champion_version: str | None
    champion_accuracy: float | None  # the champion on this week's tickets, before this week's retrain
    frozen_accuracy: float | None  # the week-1 champion on the same tickets
    drift_detected: bool
    drift_reasons: list[str]
    psi_label: float | None
    new_vocabulary_share: float | None
    metric_drop: float | None
    retrain: str  # trained / nothing_new
    promoted_version: str | None


def fresh_workspace(work: Path) -> None:
    """Wipe and point the state folder (and Prefect's home) at it, before Prefect is imported."""
    from tuneloop.core.state import prepare_state

    if work.exists():
        shutil.rmtree(work)
    os.environ["TUNELOOP_HOME"] = str(work / "home")
    os.environ["PREFECT_HOME"] = str(work / "home" / "prefect")
    prepare_state(work / "home")


def run_scenario(work: Path, weeks: int = 6, drift_at: int = 3, seed: int = 11,
                 overrides: list[str] | None = None) -> list[WeekOutcome]:
    generator = REPO_ROOT / "data" / "generate_scenario.py"
    if not generator.is_file():
        raise TuneloopError("tuneloop scenario drift runs from a clone of the tuneloop repository "
                            f"(it needs data/generate_scenario.py, not found at {generator})")
    sys.path.insert(0, str(generator.parent))
    from generate_scenario import generate

    from tuneloop.core.state import prepare_state
    from tuneloop.flows.drift import drift_monitor
    from tuneloop.flows.retrain import retrain
    from tuneloop.lib.heldout import read_heldout
    from tuneloop.lib.registry import ModelRegistry
    from tuneloop.tasks.drift import pyfunc_score

    state = prepare_state(work / "home")
    files = generate(work / "data", seed=seed, weeks=weeks, drift_at=drift_at)
    holdout = work / "holdout.jsonl"
    tracking_uri = state.tracking_uri
    outcomes: list[WeekOutcome] = []
    for week, paths in enumerate(files, start=1):
        part = state.landing / f"{paths['train'].name}.part"
        shutil.copyfile(paths["train"], part)
        part.rename(state.landing / paths["train"].name)
        window = [files[w - 1]["eval"] for w in (week - 1, week) if w >= 1]
        holdout.write_text("".join(p.read_text() for p in window))
        cfg = load_config(SCENARIO_CONFIG, [f"evaluate.holdout={holdout}", f"register.tracking_uri={tracking_uri}",
                                            *(overrides or [])])
        name = cfg.registry.model_name
        week_eval = read_heldout(paths["eval"], cfg.mapping, quality=cfg.quality)
        current = ModelRegistry(tracking_uri, name).champion_version()  # none before the first retrain
        champion = str(current.version) if current is not None else None
        frozen = champion_acc = None
        if champion:  # the week-1 model and the champion, on the tickets users sent this week
            frozen, champion_acc = (round(pyfunc_score(uri, week_eval, cfg, tracking_uri).accuracy, 4)
                                    for uri in (f"models:/{name}/1", f"models:/{name}@champion"))
        drift = drift_monitor(cfg)
        result = retrain(cfg, reason=f"data landed: {paths['train'].name}")
        promoted = (result.model_version.version if result.model_version and result.model_version.decision.promoted
                    else None)
        outcomes.append(WeekOutcome(
            week=week, champion_version=champion, champion_accuracy=champion_acc, frozen_accuracy=frozen,
            drift_detected=drift.drifted, drift_reasons=drift.reasons, psi_label=drift.psi_label,
            new_vocabulary_share=drift.new_vocabulary_share, metric_drop=drift.metric_drop, retrain=result.status,
            promoted_version=promoted))
        print(f"week {week}: champion v{champion} accuracy {champion_acc}, frozen {frozen}, "
              f"drift {drift.drifted}, retrain {result.status}, promoted {promoted}", flush=True)
    return outcomes


def plot(outcomes: list[WeekOutcome], drift_at: int, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    weeks = [o.week for o in outcomes]
    fig, ax = plt.subplots(figsize=(8, 4.2))
    loop = [(o.week, o.champion_accuracy) for o in outcomes if o.champion_accuracy is not None]
    frozen = [(o.week, o.frozen_accuracy) for o in outcomes if o.frozen_accuracy is not None]
    ax.plot(*zip(*loop, strict=True), marker="o", color="tab:blue", label="champion with the loop (retrain + gate)")
    ax.plot(*zip(*frozen, strict=True), marker="s", linestyle="--", color="tab:gray",
            label="frozen model (no retraining after week 1)")
    ax.axvspan(drift_at - 0.5, max(weeks) + 0.5, color="tab:orange", alpha=0.08, label="after the product launch")
    for o in outcomes:
        if o.drift_detected:
            ax.axvline(o.week, color="tab:red", linestyle=":", alpha=0.8)
            ax.annotate("drift detected", (o.week, 0.05), rotation=90, color="tab:red", fontsize=8, ha="right")
        if o.promoted_version:
            ax.annotate(f"promoted v{o.promoted_version}", (o.week + 0.05, 0.12), color="tab:green", fontsize=8,
                        rotation=90)
            ax.axvline(o.week + 0.08, color="tab:green", alpha=0.5)
    ax.set_xticks(weeks)
    ax.set_xlabel("week (accuracy of the model in service on that week's tickets, before that week's retrain)")
    ax.set_ylabel("queue accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"Lumenfold support: a product launch at week {drift_at}, with and without the loop")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def log_scenario(outcomes: list[WeekOutcome], png: Path, tracking_uri: str, experiment: str) -> str:
    import time

    from mlflow.entities import Metric

    from tuneloop.lib.registry import experiment_id, mlflow_client

    client = mlflow_client(tracking_uri)
    run = client.create_run(experiment_id(client, experiment, None), run_name="drift-scenario",
                            tags={"tuneloop.kind": "scenario"})
    now = int(time.time() * 1000)
    metrics = []
    for o in outcomes:
        for key in ("champion_accuracy", "frozen_accuracy", "psi_label", "new_vocabulary_share"):
            if getattr(o, key) is not None:
                metrics.append(Metric(key, float(getattr(o, key)), now, o.week))
        metrics.append(Metric("drift_detected", float(o.drift_detected), now, o.week))
        metrics.append(Metric("promoted", float(o.promoted_version is not None), now, o.week))
    client.log_batch(run.info.run_id, metrics=metrics)
    client.log_artifact(run.info.run_id, str(png))
    client.log_text(run.info.run_id, json.dumps([o.model_dump() for o in outcomes], indent=2), "scenario.json")
    client.set_terminated(run.info.run_id)
    return run.info.run_id
