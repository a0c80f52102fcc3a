"""What a person sees at the end of a run: the scores, the decision, and where to look next.

Paths, file names, columns, reasons and tags come from the data: every console here prints text as it is
(``markup=False``), and the few styled words are ``Text`` styles, so ``[/]`` in a file name is just text.
"""

from __future__ import annotations

import os
import shlex
from typing import TYPE_CHECKING

from tuneloop.core.records import METRIC_TITLES, EvalReport, ModelVersion, RetrainResult
from tuneloop.core.state import StateLayout

if TYPE_CHECKING:
    from rich.console import Console
    from rich.table import Table


def _console() -> Console:
    from rich.console import Console

    return Console(width=max(100, int(os.environ.get("COLUMNS", "100"))), markup=False)


def _styled(*parts: str | tuple[str, str]):
    """A line of plain text with some parts styled: ``("champion", "bold")``; nothing in it is markup."""
    from rich.text import Text

    return Text.assemble(*parts)


def ui_commands(state: StateLayout, mv: ModelVersion) -> list[tuple[str, str]]:
    """How to look at the run: the MLflow page of the new version (it links to its run) and the Prefect UI."""
    from tuneloop.lib.registry import mlflow_version_url

    home = shlex.quote(str(state.home))
    url, _ = mlflow_version_url(mv)
    remote = mv.tracking_uri.startswith(("http://", "https://"))
    return [
        ("MLflow", url) if remote else
        ("MLflow UI", f"make mlflow-ui TUNELOOP_HOME={home}   (or: .venv/bin/mlflow ui --backend-store-uri "
                      f"{shlex.quote(mv.tracking_uri)} --port 5000), then open {url}"),
        ("Prefect UI", f"make prefect-ui TUNELOOP_HOME={home}   (or: PREFECT_HOME={shlex.quote(str(state.prefect_home))}"
                       " .venv/bin/prefect server start), then open http://127.0.0.1:4200"),
    ]


def score_table(report: EvalReport) -> Table:
    """The three models in the task's own metrics (classification: accuracy, macro-F1; generation: exact
    match, ROUGE-L, BLEU and the judge's grade), never a column the task did not compute."""
    from rich.table import Table

    names = list(report.candidate.metrics)
    table = Table(title=f"Held-out {report.task} scores ({report.n_examples} examples)", title_justify="left")
    table.add_column("model")
    for name in names:
        table.add_column(METRIC_TITLES[name], justify="right")
    rows = [("base (zero-shot)" if report.prompted else "base", report.base),
            (f"prompted base ({report.shots})", report.prompted),
            (f"majority class ({report.majority_label})", report.majority),
            (f"previous champion (v{report.champion_version})", report.champion),
            ("fine-tuned (candidate)", report.candidate)]
    for label, s in rows:
        if s is not None:
            table.add_row(label, *(f"{s.metrics[m]:.3f}" if m in s.metrics else "" for m in names))
    return table


def print_retrain_summary(result: RetrainResult, state: StateLayout) -> None:
    console = _console()
    if result.status == "nothing_new" or result.report is None or result.model_version is None:
        console.print(f"\n{result.message or 'nothing to do'}; the champion is unchanged.", highlight=False)
        return
    table = score_table(result.report)
    console.print()
    console.print(
        f"Data: read {result.n_read} = accepted {result.n_accepted} + quarantined {result.n_quarantined}"
        f" + duplicates {result.n_duplicates}; dataset version {result.dataset_version}"
    )
    if result.distilled is not None:
        d = result.distilled
        cost = "" if d.estimated_cost_usd is None else f", estimated at most ${d.estimated_cost_usd:,.4f}"
        console.print(f"Teacher: {d.teacher} answered {d.n_answered} of {d.n_to_answer} records without an answer "
                      f"({d.n_called} asked now, {d.n_cached} from the cache{cost}); {d.n_quarantined} set aside",
                      highlight=False, markup=False)
    console.print(table)
    mv = result.model_version
    alias = (("alias ", ("champion", "bold"), " (and challenger)") if "champion" in mv.aliases
             else ("alias ", ("challenger", "bold"), "; champion unchanged"))
    console.print(_styled("Registered ", (mv.name, "bold"), " version ", (mv.version, "bold"), " with ", *alias, "."))
    console.print(f"Decision: {mv.decision.reason}", highlight=False)
    console.print(f"Run folder: {result.run_dir}", highlight=False)
    for name, command in ui_commands(state, mv):
        console.print(f"{name}: {command}", highlight=False, soft_wrap=True)


def print_check_report(path, checked, verdict: str | None, as_json: bool) -> None:
    """``tuneloop check``: counts, failed expectations, and each rejected record with its reasons."""
    import orjson

    rejected = [
        {"source": q["source"], "line": q["line"], "reasons": q["reasons"]}
        for q in map(orjson.loads, checked.quarantine_path.read_bytes().splitlines())
    ]
    duplicates = [orjson.loads(line) for line in checked.duplicates_path.read_bytes().splitlines()]
    if as_json:
        report = {
            "file": str(path), "passed": verdict is None, "reason": verdict,
            "read": checked.n_read, "accepted": checked.n_accepted, "quarantined": checked.n_quarantined,
            "duplicates": checked.n_duplicates, "without_answer": checked.n_unlabelled, "pii_redacted": checked.n_redacted,
            "expectations": [o.model_dump() for o in checked.expectations],
            "rejected": rejected, "duplicate_records": duplicates,
        }
        print(orjson.dumps(report).decode())
        return
    from rich.table import Table

    console = _console()
    teacher = (f" + without an answer {checked.n_unlabelled} (the champion answers them in a run: distill.teacher;"
               " while there is no champion, a run quarantines them)" if checked.n_unlabelled else "")
    console.print(f"{path}: read {checked.n_read} = accepted {checked.n_accepted} + quarantined "
                  f"{checked.n_quarantined} + duplicates {checked.n_duplicates}{teacher}; {checked.n_redacted} PII "
                  "matches would be redacted", highlight=False)
    failed = [o for o in checked.expectations if not o.success]
    if failed:
        table = Table(title="Failed expectations", title_justify="left")
        for col in ("suite", "expectation", "column", "check", "rows"):
            table.add_column(col, justify="right" if col == "rows" else "left")
        for o in failed:  # "check": which of two regexes on one column, say
            table.add_row(o.suite, o.expectation, o.column or "", o.title or "", str(o.unexpected_count))
        console.print(table)
    for r in rejected[:20]:
        console.print(f"  line {r['line']}: {'; '.join(r['reasons'])}", highlight=False)
    if len(rejected) > 20:
        console.print(f"  ... and {len(rejected) - 20} more (use --json for all)")
    for d in duplicates[:5]:
        console.print(f"  line {d['line']}: duplicate of line {d['duplicate_of']['line']}", highlight=False)
    console.print(_styled(("gate passes", "bold green")) if verdict is None
                  else _styled(("gate fails:", "bold red"), " ", verdict))


def print_chat_report(report, as_json: bool) -> None:
    """``tuneloop check --format chat``: per line, the codes found."""
    import orjson

    if as_json:
        print(orjson.dumps(report.to_json()).decode())
        return
    console = _console()
    console.print(f"{report.path}: {report.n_examples} examples, {report.size_bytes:,} bytes", highlight=False)
    for code, n in report.counts.items():
        console.print(f"  {code}: {n}", highlight=False)
    rows = sorted(report.line_codes.items())
    for line, codes in rows[:20]:
        console.print(f"  line {line}: {', '.join(codes)}", highlight=False)
    if len(rows) > 20:
        console.print(f"  ... and {len(rows) - 20} more lines (use --json for all)")
    for code in report.file_codes:
        console.print(f"  file: {code}", highlight=False)
    console.print(_styled(("format ok", "bold green")) if report.ok
                  else _styled(("format errors: fix the lines above", "bold red")))


def print_estimate(report, estimate, counted_with: str, refusal: str | None, as_json: bool) -> None:
    """``tuneloop estimate``: examples, tokens, over-limit examples, epochs, billed tokens, cost."""
    import orjson

    from tuneloop.lib.tokens import token_stats

    stats = token_stats(report.token_counts, estimate.context_tokens, counted_with)
    if as_json:
        print(orjson.dumps({"file": str(report.path), "format_ok": report.ok, "format_counts": report.counts,
                            "tokens": stats.model_dump(), "estimate": estimate.model_dump(),
                            "within_budget": refusal is None, "refusal": refusal}).decode())
        return
    from rich.table import Table

    table = Table(title=f"Fine-tuning estimate for {report.path}", title_justify="left", show_header=False)
    table.add_column(justify="left")
    table.add_column(justify="right")
    errors = sum(n for c, n in report.counts.items() if c != "too_many_tokens")
    for name, value in (
        ("examples (valid / in file)", f"{len(report.token_counts):,} / {report.n_examples:,}"),
        ("format errors", f"{errors:,}"),
        (f"tokens ({counted_with})", f"total {stats.total:,}, p50 {stats.p50}, p95 {stats.p95}, max {stats.max}"),
        (f"examples over {estimate.context_tokens:,} tokens (truncated)", f"{estimate.n_over_limit:,}"),
        (f"epochs ({estimate.epochs_setting})", str(estimate.epochs)),
        ("billed tokens", f"{estimate.billed_tokens:,}"),
        (f"cost at ${estimate.usd_per_1m_training_tokens}/1M ({estimate.model})", f"${estimate.estimated_cost_usd:,.2f}"),
    ):
        table.add_row(name, value)
    console = _console()
    console.print(table)
    if refusal:
        console.print(_styled(("over budget:", "bold red"), " ", refusal), highlight=False)
