"""Collect: what is new in the configured source, as a ``RawBatch`` (files, a SQL slice, refused files).

The sources themselves (``LandingFolder``, ``SqlTable``) and the readers that stream their records live in
``tuneloop.lib.sources``: the quality gate and the drift monitor read through them too.
"""

from __future__ import annotations

from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tuneloop.core.config import SourceConfig
from tuneloop.core.records import RawBatch
from tuneloop.lib.ledger import Ledger
from tuneloop.lib.sources import make_source


def describe(raw: RawBatch) -> str:
    parts = []
    if raw.files or raw.rejected:
        parts.append(f"{len(raw.files)} new file(s)" + (f", {len(raw.rejected)} refused or unreadable (quarantined)"
                                                     if raw.rejected else ""))
    if raw.sql is not None:
        sql = raw.sql
        parts.append(f"{sql.n_rows} new or changed row(s) from {sql.url} ({sql.selectable})")
        if sql.n_reread:
            since = sql.reread_from["value"] if isinstance(sql.reread_from, dict) else sql.reread_from
            parts.append(f"{sql.n_reread} row(s) read again within the look-back (from {since}): "
                         f"{sql.n_already_consumed} already consumed (same id and content), skipped")
    if raw.already_consumed:
        parts.append(f"{raw.already_consumed} file(s) already consumed")
    if raw.skipped:
        parts.append(f"{len(raw.skipped)} skipped: " + "; ".join(raw.skipped))
    return ", ".join(parts) or "nothing found"



@task(name="collect", cache_policy=NO_CACHE)
def collect_task(source: SourceConfig, landing: Path, required: list[str], ledger: Ledger) -> RawBatch:
    raw = make_source(source, landing, required).collect(ledger)
    get_run_logger().info(f"collect: {describe(raw)}")
    return raw
