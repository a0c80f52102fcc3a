"""``tuneloop scenario``: reproducible scenarios that exercise the whole loop (``app/scenario.py`` runs them).
Added to the main command by ``app/cli.py``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tuneloop.app.cli_common import SetOption, fail
from tuneloop.core.records import TuneloopError

scenario_app = typer.Typer(no_args_is_help=True, help="Reproducible scenarios that exercise the whole loop.")



@scenario_app.command("drift")
def scenario_drift(
    out: Annotated[Path, typer.Option(help="work folder (wiped first): data, state, plot")] = Path(".tuneloop-drift"),
    weeks: Annotated[int, typer.Option(min=4)] = 6,
    drift_at: Annotated[int, typer.Option(min=2, help="the week the product launch changes the tickets")] = 3,
    seed: int = 11,
    set_: SetOption = None,
) -> None:
    """Six weeks of tickets with a launch at week 3: the loop (drift monitor, retrain, promotion gate)
    against a frozen model. Writes a table, OUT/drift-scenario.png and an MLflow run."""
    if drift_at >= weeks:
        fail("--drift-at must be before the last week", 2)
    out = out.resolve()
    from tuneloop.app.scenario import fresh_workspace

    fresh_workspace(out)  # before Prefect is imported: it reads its home and timeouts once
    from rich.console import Console
    from rich.table import Table

    from tuneloop.app.scenario import log_scenario, plot, run_scenario

    try:
        outcomes = run_scenario(out, weeks, drift_at, seed, set_ or [])
    except TuneloopError as exc:
        fail(str(exc), 1)
    png = plot(outcomes, drift_at, out / "drift-scenario.png")
    from tuneloop.core.state import StateLayout

    tracking_uri = StateLayout(out / "home").tracking_uri
    run_id = log_scenario(outcomes, png, tracking_uri, "lumenfold-scenario")
    table = Table(title=f"drift scenario: launch at week {drift_at}")
    for col in ("week", "champion", "accuracy (loop)", "accuracy (frozen)", "drift", "retrain", "promoted"):
        table.add_column(col, justify="right")

    def f(v):
        return "-" if v is None else f"{v:.3f}"

    for o in outcomes:
        table.add_row(str(o.week), f"v{o.champion_version}" if o.champion_version else "-", f(o.champion_accuracy),
                      f(o.frozen_accuracy), "DRIFT" if o.drift_detected else "-", o.retrain,
                      f"v{o.promoted_version}" if o.promoted_version else "-")
    console = Console(width=max(Console().width, 100), markup=False)  # drift reasons name columns and values
    console.print(table)
    for o in outcomes:
        for reason in o.drift_reasons:
            console.print(f"week {o.week}: {reason}", highlight=False)
    console.print(f"plot: {png}\nMLflow run {run_id} in {tracking_uri}")
