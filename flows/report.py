"""What a person sees at the end of a run: the scores, the decision, and where to look next."""

from __future__ import annotations

import os
import shlex

from tasks.records import RetrainResult
from tasks.state import StateLayout


def ui_commands(state: StateLayout, tracking_uri: str) -> list[tuple[str, str]]:
    home = shlex.quote(str(state.home))
    return [
        ("MLflow UI", f"make mlflow-ui TUNELOOP_HOME={home}   (or: .venv/bin/mlflow ui --backend-store-uri "
                      f"{shlex.quote(tracking_uri)} --port 5000), then open http://127.0.0.1:5000"),
        ("Prefect UI", f"make prefect-ui TUNELOOP_HOME={home}   (or: PREFECT_HOME={shlex.quote(str(state.prefect_home))}"
                       " .venv/bin/prefect server start), then open http://127.0.0.1:4200"),
    ]


def print_retrain_summary(result: RetrainResult, state: StateLayout) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=max(100, int(os.environ.get("COLUMNS", "100"))))
    r = result.report
    table = Table(title=f"Held-out accuracy ({r.n_examples} examples)", title_justify="left")
    table.add_column("model")
    table.add_column("accuracy", justify="right")
    table.add_row("base", f"{r.base.accuracy:.3f}")
    if r.champion:
        table.add_row(f"previous champion (v{r.champion_version})", f"{r.champion.accuracy:.3f}")
    table.add_row("fine-tuned (candidate)", f"{r.candidate.accuracy:.3f}")
    console.print()
    console.print(
        f"Data: read {result.n_read} = accepted {result.n_accepted} + quarantined {result.n_quarantined}"
        f" + duplicates {result.n_duplicates}; dataset version {result.dataset_version}"
    )
    console.print(table)
    mv = result.model_version
    alias = f"alias [bold]{', '.join(mv.aliases)}[/]" if mv.aliases else "no alias (champion unchanged)"
    console.print(f"Registered [bold]{mv.name}[/] version [bold]{mv.version}[/] with {alias}.")
    console.print(f"Decision: {mv.decision.reason}", highlight=False)
    console.print(f"Run folder: {result.run_dir}", highlight=False)
    for name, command in ui_commands(state, mv.tracking_uri):
        console.print(f"{name}: {command}", highlight=False, soft_wrap=True)
