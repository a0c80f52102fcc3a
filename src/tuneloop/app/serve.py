"""``tuneloop serve``: everything the loop needs, on one machine, against a Prefect server.

Deployments (served by this process, which runs their flow runs as subprocesses):
- ``retrain/retrain``: on the config's schedule, on ``tuneloop.data.landed`` for this dataset, on
  ``tuneloop.drift.detected`` for this model, and with ``migrate=True`` on ``tuneloop.migration.due`` for this
  model (its API-backed champion nears its provider's shutdown); at most one at a time, later ones queued
  (ENQUEUE).
- ``drift-monitor/drift-monitor``: on its own schedule (daily by default).
With ``train.local.placement: pool`` it also deploys ``train-local`` to the ``gpu`` work pool and starts a
process worker for it. The landing watcher runs in a thread unless ``watch`` is off.

deployments/prefect.yaml declares the same deployments for workers and an existing server or Prefect Cloud.
"""

from __future__ import annotations

import atexit
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

from tuneloop.core.config import PipelineConfig, load_config, packaged
from tuneloop.core.records import TuneloopError

PREFECT_YAML = packaged("deployments", "prefect.yaml")


def require_api() -> str:
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise TuneloopError("no Prefect server: start one (`make prefect-server`, or `prefect server start`) and set "
                            "PREFECT_API_URL=http://127.0.0.1:4200/api, or log in to Prefect Cloud")
    return url


def retrain_triggers(config: PipelineConfig, params: dict) -> list:
    from prefect.events import DeploymentEventTrigger

    def started_by(what: str) -> dict:
        return {**params, "reason": {"__prefect_kind": "jinja",
                                     "template": what + ": {{ event.payload.summary }}"}}

    return [
        DeploymentEventTrigger(
            name="retrain when data lands", expect={"tuneloop.data.landed"},
            match={"prefect.resource.id": f"tuneloop.dataset.{config.name}", "tuneloop.coalesced": "false"},
            parameters=started_by("data landed")),
        DeploymentEventTrigger(
            name="retrain on drift", expect={"tuneloop.drift.detected"},
            match={"prefect.resource.id": f"tuneloop.model.{config.registry.model_name}"},
            parameters=started_by("drift detected")),
        DeploymentEventTrigger(
            name="migrate before the champion retires", expect={"tuneloop.migration.due"},
            match={"prefect.resource.id": f"tuneloop.model.{config.registry.model_name}"},
            parameters={**started_by("migration due"), "migrate": True}),
    ]


def build_deployments(config_path: Path, overrides: list[str]) -> tuple[PipelineConfig, list]:
    from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
    from prefect.types.entrypoint import EntrypointType

    from tuneloop.flows.drift import drift_monitor
    from tuneloop.flows.retrain import retrain

    config = load_config(config_path, overrides)
    params = {"config": str(config_path.resolve()), "overrides": overrides}
    sched = config.schedule

    def cron(expr: str | None) -> dict:
        from prefect.client.schemas.schedules import CronSchedule

        return {"schedule": CronSchedule(cron=expr, timezone=sched.timezone)} if expr else {}

    timing = {"interval": sched.retrain_interval_seconds} if sched.retrain_interval_seconds else cron(sched.retrain_cron)
    # By module path: the runner imports tuneloop.flows.retrain wherever tuneloop is installed.
    module = {"entrypoint_type": EntrypointType.MODULE_PATH}
    retrain_dep = retrain.to_deployment(
        name="retrain", **module, parameters=params, triggers=retrain_triggers(config, params),
        concurrency_limit=ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE),
        description="Retrain on new data; promote only a better model.", tags=["tuneloop", config.name], **timing)
    drift_dep = drift_monitor.to_deployment(
        name="drift-monitor", **module, parameters=params, description="Check the champion for drift; ask for a retrain.",
        tags=["tuneloop", config.name], **cron(sched.drift_cron))
    return config, [retrain_dep, drift_dep]


def start_gpu_worker(env: dict | None = None) -> subprocess.Popen:
    """Deploy train-local to the gpu pool (created if missing) and start a process worker for it."""
    prefect = str(Path(sys.executable).parent / "prefect")
    env = {**os.environ, **(env or {})}
    subprocess.run([prefect, "work-pool", "create", "gpu", "--type", "process", "--overwrite"], env=env,
                   capture_output=True, check=False)
    done = subprocess.run([prefect, "--no-prompt", "deploy", "--prefect-file", str(PREFECT_YAML), "--name",
                           "train-local"], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise TuneloopError(f"could not deploy train-local to the gpu pool:\n{done.stdout[-1500:]}{done.stderr[-1500:]}")
    worker = subprocess.Popen([prefect, "worker", "start", "--pool", "gpu", "--type", "process"], env=env,
                              start_new_session=True)

    def stop() -> None:
        if worker.poll() is None:
            os.killpg(worker.pid, signal.SIGTERM)

    atexit.register(stop)
    return worker


def serve(config_path: Path, overrides: list[str], watch: bool = True, query_seconds: float = 1.0) -> None:
    from prefect import serve as prefect_serve

    from tuneloop.core.state import prepare_state

    state = prepare_state()
    require_api()
    config, deployments = build_deployments(config_path, overrides)
    if config.train.on_pool:
        start_gpu_worker()
    if watch:
        from tuneloop.app.watch import watch as watch_landing

        threading.Thread(target=watch_landing, args=(config, state.home), daemon=True, name="tuneloop-watch").start()
    # query_seconds: how often the runner asks for runs to start; Prefect's default (10 s) alone would
    # spend the whole landing-to-start budget.
    prefect_serve(*deployments, query_seconds=query_seconds)
