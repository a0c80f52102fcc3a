"""The ``tuneloop`` command. Heavy libraries load inside commands, so ``--help`` answers at once."""

from __future__ import annotations

import os
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
    except RuntimeError as exc:
        if "ephemeral Prefect API server" not in str(exc):
            raise
        fail("the local Prefect API server did not start (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="
             f"{os.environ.get('PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS')}); raise that timeout, or start "
             "one with `make prefect-ui` and set PREFECT_API_URL=http://127.0.0.1:4200/api", 1)
    from flows.report import print_retrain_summary

    print_retrain_summary(result, state)


@app.command()
def check(
    path: Annotated[Path, typer.Argument(help="a JSONL, CSV or Parquet file")],
    config: ConfigOption = None,
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False,
    out: Annotated[Path | None, typer.Option(help="keep quarantine, duplicates and Data Docs in this folder")] = None,
) -> None:
    """Run the quality gate on one file without consuming it. Exit 0: passes, 1: fails, 2: unusable input."""
    import tempfile

    from tasks.state import prepare_state

    prepare_state()
    from flows.config import load_config
    from flows.report import print_check_report

    try:
        cfg = load_config(config, set_ or [])
    except TuneloopError as exc:
        fail(str(exc), 2)
    from tasks.collect import FORMATS, check_columns, sha256_file
    from tasks.quality import QualityGateFailed, check_batch, enforce_gate, required_fields
    from tasks.records import LandingFile, RawBatch

    if not path.is_file():
        fail(f"{path}: no such file", 2)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        fail(f"{path}: unknown format {path.suffix!r} (known: {', '.join(sorted(FORMATS))})", 2)
    try:
        check_columns(path, fmt, required_fields(cfg.mapping))
    except TuneloopError as exc:
        fail(str(exc), 2)
    except Exception as exc:  # e.g. a corrupt Parquet footer
        fail(f"{path}: unreadable {fmt} file ({type(exc).__name__}: {exc})", 2)
    raw = RawBatch(files=[LandingFile(path=str(path), sha256=sha256_file(path), size=path.stat().st_size, format=fmt)])
    with tempfile.TemporaryDirectory(prefix="tuneloop-check-") as tmp:
        run_dir = out or Path(tmp)
        quality = cfg.quality.model_copy(update={"data_docs": cfg.quality.data_docs and out is not None})
        try:
            checked = check_batch(raw, cfg.source, cfg.mapping, quality, run_dir)
        except TuneloopError as exc:
            fail(str(exc), 2)
        try:
            enforce_gate(checked, cfg.quality)
            verdict = None
        except QualityGateFailed as exc:
            verdict = str(exc).split("; reasons in")[0]
        print_check_report(path, checked, verdict, as_json)
    raise typer.Exit(0 if verdict is None else 1)


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
