"""The loop running by itself, against a real Prefect server started here (SQLite in a temp folder).

`tuneloop serve` serves the deployments, `tuneloop watch` watches the landing folder; the test only
drops files and asks Prefect what ran. Every process started here is stopped here, by process group.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from services import BIN, PrefectServer, stop_group, wait_until

from conftest import DEMO, ROOT

pytestmark = pytest.mark.slow

TUNELOOP = str(BIN / "tuneloop")


def overrides(uri: str, *extra: str) -> list[str]:
    sets = ["train.local.max_steps=30", "evaluate.max_examples=20", "drift.window=60", f"register.tracking_uri={uri}",
            "schedule.retrain_cron=null", "schedule.drift_cron=null", "schedule.poll_seconds=0.5",
            "drift.min_examples=20",
            # 30 steps of a tiny model learn the format, not the task: these tests are about triggers and the
            # loop, so the floors a real candidate must clear (tested in test_promotion) are off
            "register.beat_majority=false", "register.beat_prompted=false", "evaluate.few_shot=0", *extra]
    return [x for s in sets for x in ("--set", s)]


def land(folder: Path, name: str, lines: list[str]) -> None:
    """The way a writer should: write under a temporary name, then rename."""
    part = folder / f"{name}.part"
    part.write_text("".join(lines))
    part.rename(folder / name)


def flow_runs(server: PrefectServer, deployment: str) -> list:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
    from prefect.client.schemas.sorting import FlowRunSort

    async def read():
        async with get_client() as client:
            return await client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
                sort=FlowRunSort.EXPECTED_START_TIME_ASC)

    with server.client_settings():
        return asyncio.run(read())


def consumed(home: Path) -> dict[str, str]:
    from tuneloop.core.state import StateLayout

    ledger = StateLayout(home).ledger
    if not ledger.exists():
        return {}
    return {f["name"]: f["dataset_version"] for f in json.loads(ledger.read_text())["files"].values()}


def finished(runs) -> bool:
    return bool(runs) and all(r.state and r.state.is_final() for r in runs)


@pytest.fixture
def loop(tmp_path):
    server = PrefectServer(tmp_path / "prefect")
    server.env["PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS"] = "2"
    try:
        server.start()
        yield server
    finally:
        server.stop()


def serve(server: PrefectServer, home: Path, sets: list[str], log: str = "serve.log"):
    proc = server.spawn([TUNELOOP, "serve", "--no-watch", "--config", str(ROOT / "deployments" / "demo.yaml"), *sets],
                        log, env={"TUNELOOP_HOME": str(home)}, cwd=ROOT)

    def deployed():
        if proc.poll() is not None:
            raise AssertionError(f"tuneloop serve exited:\n{(server.root / log).read_text()[-3000:]}")
        return "retrain" in server.cli("deployment", "ls")

    wait_until(deployed, 120, "tuneloop serve to create its deployments", interval=2)
    return proc


def test_landing_triggers_one_retrain_at_a_time_and_drift_triggers_another(loop, tmp_path):
    from mlflow import MlflowClient

    home = tmp_path / "home"
    landing = home / "landing"
    landing.mkdir(parents=True)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    sets = overrides(uri)
    serve(loop, home, sets)
    watcher = loop.spawn([TUNELOOP, "watch", "--config", str(ROOT / "deployments" / "demo.yaml"), *sets],
                         "watch.log", env={"TUNELOOP_HOME": str(home)}, cwd=ROOT)
    lines = (DEMO / "tickets.jsonl").read_text().splitlines(True)

    # 1. A file lands: the watcher's event starts a retrain, which trains and promotes.
    land(landing, "week-1.jsonl", lines[:400])
    wait_until(lambda: flow_runs(loop, "retrain"), 60, "a retrain started by the landing")
    # 2. Two more land while it runs (after it took in the first): one follow-up run takes in both.
    wait_until(lambda: "week-1.jsonl" in consumed(home), 120, "the first run to consume week-1.jsonl")
    land(landing, "week-2a.jsonl", lines[400:550])
    time.sleep(1.5)
    land(landing, "week-2b.jsonl", lines[550:700])
    wait_until(lambda: {"week-2a.jsonl", "week-2b.jsonl"} <= set(consumed(home)), 300,
               "a follow-up run to consume both files")
    wait_until(lambda: finished(flow_runs(loop, "retrain")), 300, "the retrains to finish")
    time.sleep(8)  # a third, wrongly triggered run would have been created by now
    runs = flow_runs(loop, "retrain")
    assert [r.state.type.value for r in runs] == ["COMPLETED", "COMPLETED"], [(r.name, r.state) for r in runs]
    assert all(r.parameters["reason"].startswith("data landed: ") for r in runs)
    ledger = consumed(home)
    assert ledger["week-2a.jsonl"] == ledger["week-2b.jsonl"] != ledger["week-1.jsonl"]
    client = MlflowClient(uri)
    versions = client.search_model_versions("name = 'lumenfold-support'")
    assert len(versions) == 2  # two trainings: the first run and the one follow-up
    assert client.get_model_version_by_alias("lumenfold-support", "champion")  # something to monitor
    stop_group(watcher)

    # 3. Shifted data lands while nobody watches; the daily drift check finds it and asks for a retrain.
    shifted = []
    for line in lines[700:820]:
        row = json.loads(line)
        row["queue"] = "restore"  # after a launch, most tickets are about restoring from the new hub
        row["body"] = "Quantacore hub firmware bricked: Quantacore pairing fails after flashing. " + row["body"]
        shifted.append(json.dumps(row) + "\n")
    land(landing, "week-3.jsonl", shifted)
    loop.cli("deployment", "run", "drift-monitor/drift-monitor", cwd=ROOT)
    wait_until(lambda: finished(flow_runs(loop, "drift-monitor")), 180, "the drift monitor to finish")
    assert flow_runs(loop, "drift-monitor")[0].state.is_completed()
    drift_runs = client.search_runs([client.get_experiment_by_name("lumenfold-support").experiment_id],
                                    filter_string="tags.`tuneloop.kind` = 'drift'")
    assert len(drift_runs) == 1 and drift_runs[0].data.metrics["drifted"] == 1.0, drift_runs and drift_runs[0].data
    assert drift_runs[0].data.metrics["psi_label"] > 0.2
    wait_until(lambda: len(flow_runs(loop, "retrain")) == 3 and finished(flow_runs(loop, "retrain")), 300,
               "the retrain the drift event triggers")
    drift_run = flow_runs(loop, "retrain")[-1]
    assert drift_run.state.is_completed() and drift_run.parameters["reason"].startswith("drift detected: ")
    assert "week-3.jsonl" in consumed(home)


def test_the_schedule_starts_a_retrain_that_ends_early_with_nothing_new(loop, tmp_path):
    home = tmp_path / "home"
    (home / "landing").mkdir(parents=True)
    serve(loop, home, overrides(f"sqlite:///{tmp_path / 'mlflow.db'}", "schedule.retrain_interval_seconds=10"))
    wait_until(lambda: any(r.state.is_completed() for r in flow_runs(loop, "retrain")), 120,
               "a scheduled retrain to complete")
    run = next(r for r in flow_runs(loop, "retrain") if r.state.is_completed())
    assert run.auto_scheduled  # created by the schedule, not by an event
    assert run.total_run_time.total_seconds() < 30  # nothing new: no export, no training


def test_watch_once_without_a_server_says_how_to_get_one(tmp_path):
    import subprocess

    env = {k: v for k, v in __import__("os").environ.items() if k != "PREFECT_API_URL"}
    done = subprocess.run([TUNELOOP, "watch", "--once"], env={**env, "TUNELOOP_HOME": str(tmp_path)},
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 2 and "PREFECT_API_URL" in done.stderr and "Traceback" not in done.stderr




def test_a_failed_retrain_and_a_promotion_reach_the_webhook(loop, tmp_path):
    """`tuneloop notify` wires a webhook block and two automations; the server posts to a local receiver."""
    import http.server
    import subprocess
    import threading

    from prefect.events import emit_event

    from tuneloop.flows.retrain import retrain

    received: list[dict] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{receiver.server_address[1]}/hook"
        done = subprocess.run([TUNELOOP, "notify", "--webhook", url], env=loop.env, capture_output=True, text=True,
                              cwd=ROOT)
        assert done.returncode == 0, done.stderr
        with loop.client_settings():
            with pytest.raises(Exception, match="config file not found"):
                retrain(str(tmp_path / "missing.yaml"))
            emit_event("tuneloop.model.promoted",
                       resource={"prefect.resource.id": "tuneloop.model.lumenfold-support",
                                 "prefect.resource.name": "lumenfold-support"},
                       payload={"version": "7", "summary": "lumenfold-support version 7 promoted: better"})
        wait_until(lambda: len(received) >= 2, 90, "two notifications at the webhook")
    finally:
        receiver.shutdown()
    subjects = sorted(r["subject"] for r in received)
    assert subjects[0].startswith("tuneloop: lumenfold-support v7 is the new champion")
    assert subjects[1].startswith("tuneloop: retrain ") and "Failed" in subjects[1]
    assert any("config file not found" in r["body"] for r in received)


def test_prefect_yaml_deploys_retrain_drift_monitor_and_train_local(loop):
    """The worker route: `prefect deploy --all` from deployments/prefect.yaml against a real server."""
    import asyncio

    from prefect.client.orchestration import get_client

    loop.cli("work-pool", "create", "tuneloop", "--type", "process")
    loop.cli("work-pool", "create", "gpu", "--type", "process")
    loop.cli("--no-prompt", "deploy", "--prefect-file", "deployments/prefect.yaml", "--all", cwd=ROOT)

    async def read():
        async with get_client() as client:
            deps = {n: await client.read_deployment_by_name(n)
                    for n in ("retrain/retrain", "drift-monitor/drift-monitor", "train-local/train-local")}
            return deps, await client.read_automations()

    with loop.client_settings():
        deps, automations = asyncio.run(read())
    retrain = deps["retrain/retrain"]
    assert [s.schedule.cron for s in retrain.schedules] == ["0 3 * * 1"]
    assert retrain.global_concurrency_limit.limit == 1
    assert retrain.concurrency_options.collision_strategy.value == "ENQUEUE"
    assert retrain.parameters["config"] == "deployments/demo.yaml" and retrain.work_pool_name == "tuneloop"
    assert [s.schedule.cron for s in deps["drift-monitor/drift-monitor"].schedules] == ["0 6 * * *"]
    assert deps["train-local/train-local"].work_pool_name == "gpu"
    triggers = {a.name: a for a in automations}
    landed = triggers["retrain when data lands"].trigger
    assert landed.expect == {"tuneloop.data.landed"} and landed.match.root["tuneloop.coalesced"] == "false"
    assert triggers["retrain on drift"].trigger.expect == {"tuneloop.drift.detected"}
