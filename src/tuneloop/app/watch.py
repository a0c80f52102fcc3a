"""Landing detection: notice complete new files (or new rows past the SQL watermark) and say so to Prefect.

A long-running poller rather than a scheduled sensor flow: a sensor deployment would cost a flow run (and
its process start, seconds) per check, so checking every second would flood the UI and miss the 10 s
budget from a file's completion to the retrain starting. Polling, not inotify: landing folders are often
network mounts, where inotify sees nothing. What counts as complete and new is the collect stage's own
rule (temporary suffixes, minimum age, marker files, the consumption ledger), so the watcher and the
retrain never disagree about a file.

Each landing is one ``tuneloop.data.landed`` event (resource ``tuneloop.dataset.<name>``; the payload
lists what landed). While a retrain started by an earlier landing is still waiting to start, new landings
are marked ``tuneloop.coalesced: true``: that run will take them in, so the trigger (which matches only
uncoalesced events) does not queue another.
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from tuneloop.core.config import PipelineConfig
from tuneloop.core.mapping import required_fields
from tuneloop.core.scrub import scrub
from tuneloop.core.state import StateLayout
from tuneloop.lib.ledger import load_ledger
from tuneloop.lib.sources import make_source

LANDED_EVENT = "tuneloop.data.landed"
log = logging.getLogger("tuneloop.watch")


def dataset_resource(config: PipelineConfig, coalesced: bool) -> dict[str, str]:
    return {"prefect.resource.id": f"tuneloop.dataset.{config.name}", "prefect.resource.name": config.name,
            "tuneloop.coalesced": str(coalesced).lower()}


@dataclass
class Watcher:
    config: PipelineConfig
    home: Path
    deployment: str = "retrain/retrain"
    seen: set[str] = field(default_factory=set)  # sha256 of files (or SQL high-water marks) already announced
    last_trigger: datetime | None = None

    def poll(self) -> dict | None:
        """What landed since the last poll (complete, not consumed, not announced), or None."""
        state = StateLayout(self.home)
        landing = getattr(self.config.source, "landing", None) or state.landing
        raw = make_source(self.config.source, landing, required_fields(self.config.mapping, self.config.distill.teacher != "none")).collect(
            load_ledger(state.ledger))
        files = [f for f in raw.files if f.sha256 not in self.seen]
        sql, sql_key = None, None
        if raw.sql is not None and raw.sql.n_rows:
            # rows committed late under an unchanged watermark are news too: the key covers the window's rows
            window = hashlib.sha256("\n".join(sorted(raw.sql.window or [])).encode()).hexdigest()[:16]
            sql_key = f"sql:{raw.sql.up_to}:{window}"
            sql = raw.sql if sql_key not in self.seen else None
        if not files and sql is None:
            return None
        return {
            "keys": [f.sha256 for f in files] + ([sql_key] if sql is not None else []),
            "files": [{"name": Path(f.path).name, "size": f.size, "sha256": f.sha256} for f in files],
            "sql": sql.model_dump(mode="json", exclude={"consumed", "window"}) if sql is not None else None,
            "summary": ", ".join([Path(f.path).name for f in files]
                                 + ([f"{sql.n_rows} rows of {sql.selectable} past {sql.watermark}"] if sql else [])),
        }

    def _runs(self, *states) -> list:
        """Flow runs of the retrain deployment in these state types."""
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterName,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )

        with get_client(sync_client=True) as client:
            return client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[self.deployment.split("/")[-1]])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=list(states)))),
                limit=50)

    def retrain_waiting(self) -> bool:
        """A retrain that has not started yet will collect whatever lands now."""
        from prefect.client.schemas.objects import StateType

        now = datetime.now(UTC)
        if self.last_trigger and now - self.last_trigger < timedelta(seconds=30):
            # The event of the last landing may not have become a flow run yet (a few seconds).
            started = self._runs(StateType.RUNNING, StateType.COMPLETED, StateType.FAILED, StateType.CRASHED)
            if not any(r.start_time and r.start_time >= self.last_trigger for r in started):
                return True
        waiting = self._runs(StateType.SCHEDULED, StateType.PENDING)
        return any(not r.auto_scheduled or (r.expected_start_time and r.expected_start_time <= now) for r in waiting)

    def announce(self, landed: dict) -> bool:
        """Emit the event; True when it will start a retrain (it was not coalesced)."""
        from prefect.events import emit_event

        coalesced = self.retrain_waiting()
        keys = landed.pop("keys")
        emit_event(LANDED_EVENT, resource=dataset_resource(self.config, coalesced),
                   payload={**landed, "coalesced": coalesced})
        self.seen.update(keys)  # only once announced: a failed emit is retried at the next poll
        if not coalesced:
            self.last_trigger = datetime.now(UTC)
        log.info(f"landed: {landed['summary']}" + (" (a waiting retrain will take it in)" if coalesced else
                                                   " -> retrain requested"))
        return not coalesced


def watch(config: PipelineConfig, home: Path, deployment: str = "retrain/retrain", once: bool = False,
          stop=lambda: False) -> None:
    """Poll every schedule.poll_seconds until stopped; errors of one poll are logged, never fatal. A SQL source
    whose database driver is not installed is logged once, and nothing is watched."""
    watcher = Watcher(config, home, deployment)
    if config.source.kind == "sql" and (problem := config.source.driver_problem()):
        log.error(f"watch: {problem}")  # it would fail every poll: said once, and nothing to watch
        return
    # Files already waiting when the watcher starts are announced too: nothing landed is ever ignored.
    while not stop():
        try:
            landed = watcher.poll()
            if landed:
                watcher.announce(landed)
        except Exception as exc:  # a flaky share or a restarting Prefect server must not stop the watcher
            log.warning(scrub(f"watch: {type(exc).__name__}: {exc}"))  # a driver's error may carry the URL
        if once:
            return
        time.sleep(config.schedule.poll_seconds)
