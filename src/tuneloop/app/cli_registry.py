"""The registry commands of ``tuneloop``: ``models``, ``promote``, ``rollback``, through ``lib.registry``'s
``ModelRegistry``. Added to the main command by ``app/cli.py``."""

from __future__ import annotations

import os
from typing import Annotated

import typer

from tuneloop.app.cli_common import ConfigOption, SetOption, fail, registry_config, who
from tuneloop.core.records import TuneloopError

app = typer.Typer()

def _score_cell(value: str | None) -> str:
    """A score tag as three decimals, as the run summary shows it (tags are strings, maybe from older runs)."""
    try:
        return f"{float(value):.3f}" if value is not None else ""
    except ValueError:
        return value



@app.command()
def models(config: ConfigOption = None, set_: SetOption = None,
           as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False) -> None:
    """List the registered versions with their aliases, scores and dataset versions, and when API-backed ones
    stop answering (a warning line when the champion does within retirement.warn_days)."""
    cfg, uri = registry_config(config, set_)
    name = cfg.registry.model_name
    from tuneloop.core.retirement import champion_warning, today_utc, version_retirement, within_warning
    from tuneloop.lib.registry import ModelRegistry

    try:
        versions = ModelRegistry(uri, name).versions()
    except TuneloopError as exc:
        fail(str(exc), 1)
    today, warning, rows = today_utc(), None, []
    for v in versions:
        rows.append(r := v.row())
        found = version_retirement(v.lineage, cfg.retirement, cfg.train.openai.provider)
        r["retirement"] = found.as_dict(today) if found else None
        if "champion" in r["aliases"] and within_warning(found, cfg.retirement, today):
            warning = champion_warning(r["version"], found, cfg.retirement, today)
    if as_json:
        import orjson

        print(orjson.dumps({"model": name, "versions": rows, "retirement_warning": warning}).decode())
        return
    from rich.console import Console
    from rich.table import Table

    from tuneloop.core.records import METRIC_TITLES

    # the metrics the versions were registered with: a generation model has no accuracy to show as 0
    metrics = [m for m in METRIC_TITLES if any(m in r for r in rows)]
    retiring = any(r["retirement"] for r in rows)  # the column only when an API-backed version has a date
    width = max(100, int(os.environ.get("COLUMNS", "100")))
    table = Table(title=f"{name} at {uri}", title_justify="left")
    for col in ("version", "aliases", *(METRIC_TITLES[m] for m in metrics), "dataset", "backend", "promoted",
                *(["retires"] if retiring else [])):
        # the retirement date whole (never "2027-01-…"); on a narrow console, room made from the dataset hash
        table.add_column(col, min_width=10 if col == "retires" else None,
                         max_width=8 if col == "dataset" and retiring and width < 120 else None)
    for r in rows:
        when = r["retirement"]
        table.add_row(r["version"], ", ".join(r["aliases"]), *(_score_cell(r.get(m)) for m in metrics),
                      r["dataset_version"] or "", r["backend"] or "", r["promoted"] or "",
                      *([f"{when['date']} ({when['relative']})" if when else ""] if retiring else []))
    console = Console(width=width, markup=False)  # tags, as they are
    console.print(table)
    if warning:
        console.print(f"warning: {warning}", style="bold yellow", highlight=False)



@app.command()
def promote(version: Annotated[str, typer.Argument(help="the model version to make champion")],
            reason: Annotated[str, typer.Option(help="why, recorded on the version")] = "manual promotion",
            config: ConfigOption = None, set_: SetOption = None) -> None:
    """Make VERSION the champion by hand; who and why are recorded as version tags. An Azure fine-tune with
    train.openai.azure_deployments: the champion's deployment is re-pointed to it first."""
    cfg, uri = registry_config(config, set_)
    name = cfg.registry.model_name
    from tuneloop.lib.registry import ModelRegistry

    try:
        previous = ModelRegistry(uri, name).promote(version, who(), reason, cfg.train.openai)
    except TuneloopError as exc:
        fail(str(exc), 1)
    print(f"{name}: champion is now version {version}" + (f" (was {previous})" if previous else ""))



@app.command()
def rollback(reason: Annotated[str, typer.Option(help="why, recorded on both versions")] = "manual rollback",
             config: ConfigOption = None, set_: SetOption = None) -> None:
    """Move the champion back to the version that was champion before it (an Azure fine-tune with
    train.openai.azure_deployments: the champion's deployment is re-pointed to it first)."""
    cfg, uri = registry_config(config, set_)
    name = cfg.registry.model_name
    from tuneloop.lib.registry import ModelRegistry

    try:
        current, previous = ModelRegistry(uri, name).rollback(who(), reason, cfg.train.openai)
    except TuneloopError as exc:
        fail(str(exc), 1)
    print(f"{name}: champion rolled back from version {current} to version {previous}")
