"""Quality: the gate's verdict on a batch. The gate itself (records mapped, duplicates dropped, the GX suites
run, every record accounted for) is ``tuneloop.lib.gate.check_batch``, shared with ``tuneloop check`` and
the drift monitor; this stage runs it, shows its outcome and stops the run when too much was quarantined.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from tuneloop.core.config import DistillConfig, MappingConfig, QualityConfig
from tuneloop.core.records import CheckedBatch, TuneloopError
from tuneloop.lib.gate import check_batch


class QualityGateFailed(TuneloopError):
    """The batch as a whole is not fit to train on; nothing downstream runs."""



def enforce_quarantine_limit(checked: CheckedBatch, quality: QualityConfig) -> None:
    if checked.quarantined_fraction > quality.max_quarantine_fraction:
        raise QualityGateFailed(
            f"quality gate failed: {checked.n_quarantined} of {checked.n_read} records quarantined"
            f" ({checked.quarantined_fraction:.1%} > quality.max_quarantine_fraction"
            f" {quality.max_quarantine_fraction:.1%}); reasons in {checked.quarantine_path}"
        )



def enforce_min_examples(n_examples: int, quality: QualityConfig, what: str = "examples accepted") -> None:
    if n_examples < quality.min_examples:
        raise QualityGateFailed(
            f"quality gate failed: {n_examples} {what}, quality.min_examples is {quality.min_examples}"
        )



def enforce_gate(checked: CheckedBatch, quality: QualityConfig) -> None:
    """The gate for one batch on its own (``tuneloop check``); the flow checks min_examples on the snapshot."""
    enforce_quarantine_limit(checked, quality)
    enforce_min_examples(checked.n_accepted, quality)



def summary_markdown(checked: CheckedBatch) -> str:
    lines = [
        "## Quality gate",
        "",
        "| read | accepted | quarantined | duplicates | without an answer (for the teacher) | PII redacted |",
        "|---:|---:|---:|---:|---:|---:|",
        f"| {checked.n_read} | {checked.n_accepted} | {checked.n_quarantined} | {checked.n_duplicates}"
        f" | {checked.n_unlabelled} | {checked.n_redacted} |",
        "",
        "| suite | expectation | column | check | result | unexpected |",
        "|---|---|---|---|---|---:|",
    ]
    for o in checked.expectations:
        check = (o.title or "").replace("|", "/")  # the suite's words: no column break
        lines.append(f"| {o.suite} | {o.expectation} | {o.column or ''} | {check} | {'pass' if o.success else 'FAIL'}"
                     f" | {o.unexpected_count} |")
    lines += ["", f"Quarantine: `{checked.quarantine_path}`", f"Duplicates: `{checked.duplicates_path}`"]
    if checked.data_docs:
        lines.append(f"Data Docs: `{checked.data_docs}`")
    return "\n".join(lines)



@task(name="quality", cache_policy=NO_CACHE)
def quality_task(raw, source, mapping: MappingConfig, quality: QualityConfig, run_dir: Path,
                 distill: DistillConfig | None = None) -> CheckedBatch:
    checked = check_batch(raw, source, mapping, quality, run_dir, distill)
    create_markdown_artifact(summary_markdown(checked), key="quality-gate", description="quality gate outcome")
    get_run_logger().info(
        f"quality: read {checked.n_read} = accepted {checked.n_accepted} + quarantined {checked.n_quarantined}"
        f" + duplicates {checked.n_duplicates}"
        + (f" + {checked.n_unlabelled} without an answer, for the teacher" if checked.n_unlabelled else "")
        + f"; {checked.n_redacted} PII matches redacted"
        + (f"; Data Docs: {checked.data_docs}" if checked.data_docs else ""))
    enforce_quarantine_limit(checked, quality)
    return checked
