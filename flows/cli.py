"""The ``tuneloop`` command. Heavy libraries load inside commands, so ``--help`` answers at once."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from tasks.records import TuneloopError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="tuneloop keeps a fine-tuned language model fresh on your own data: collect, quality gate, "
    "export, train, evaluate, register in MLflow, repeat.",
)

ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="pipeline config (YAML); default: deployments/demo.yaml", dir_okay=False),
]
SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a config key, e.g. --set train.local.max_steps=20 (repeatable)"),
]


@app.callback()
def _root() -> None:
    """Subcommands below; each reads the pipeline config and the state folder ($TUNELOOP_HOME)."""


def fail(message: str, code: int) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold red]error:[/] {message}", highlight=False, markup=True, soft_wrap=True)
    raise typer.Exit(code)


@app.command()
def run(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Run the retrain flow once on what is in the landing folder."""
    from tasks.state import prepare_state

    state = prepare_state()
    from flows.config import load_config

    try:
        cfg = load_config(config, set_ or [])
    except TuneloopError as exc:
        fail(str(exc), 2)
    from flows.retrain import retrain

    try:
        result = retrain(cfg)
    except TuneloopError as exc:
        fail(str(exc), 1)
    from flows.report import print_retrain_summary

    print_retrain_summary(result, state)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
