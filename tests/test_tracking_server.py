"""Registration against a real MLflow tracking server (started here on a loopback port, then stopped)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from conftest import DEMO_CONFIG, ROOT
from tuneloop.core.config import load_config
from tuneloop.core.records import EvalReport, ExportedDataset, LocalAdapter, ModelScore
from tuneloop.core.state import StateLayout
from tuneloop.lib.registry import ModelRegistry
from tuneloop.lib.run_context import RunContext
from tuneloop.tasks.register import register_candidate

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path / 'server.db'}",
         "--artifacts-destination", str(tmp_path / "server-artifacts"), "--serve-artifacts"],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true"})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"mlflow server did not start: {server.stderr.read().decode()[-2000:]}") from None
                time.sleep(0.5)
        yield url, tmp_path / "server-artifacts"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def records(tmp_path: Path, accuracy: float):
    run = tmp_path / f"run-{accuracy}"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter" / "adapter_config.json").write_text(json.dumps({"r": 16, "acc": accuracy}))
    (run / "export").mkdir()
    for name in ("train.jsonl", "validation.jsonl", "manifest.json"):
        (run / "export" / name).write_text("{}\n")
    (run / "predictions.jsonl").write_text("{}\n")
    score = lambda a: ModelScore(accuracy=a, macro_f1=a, n_examples=10, n_unparsed=0)  # noqa: E731
    exported = ExportedDataset(dataset_version=f"d{accuracy}", directory=run / "export",
                               train_path=run / "export" / "train.jsonl", validation_path=run / "export" / "validation.jsonl",
                               manifest_path=run / "export" / "manifest.json", n_train=1, n_validation=1, sha256={})
    trained = LocalAdapter(base_model="tiny", adapter_path=run / "adapter",
                           dataset_version=f"d{accuracy}", steps=1, train_loss=0.5, train_seconds=1.0)
    return exported, trained, score


def context(tmp_path: Path, url: str, cfg, flow_run_id: str) -> RunContext:
    return RunContext(StateLayout(tmp_path / "home"), tmp_path, flow_run_id, ModelRegistry(url, cfg.registry.model_name))


def test_register_promote_and_fetch_the_champion_through_a_tracking_server(mlflow_server, tmp_path):
    url, stored = mlflow_server
    cfg = load_config(DEMO_CONFIG, [f"register.tracking_uri={url}"])
    exported, trained, score = records(tmp_path, 0.8)
    report = EvalReport(n_examples=10, base=score(0.1), candidate=score(0.8),
                        predictions_path=exported.directory.parent / "predictions.jsonl")
    first = register_candidate(context(tmp_path, url, cfg, "flow-1"), cfg, None, exported, trained, report)
    assert first.decision.promoted and first.aliases == ["champion", "challenger"]

    champion = ModelRegistry(url, cfg.registry.model_name).download_champion(tmp_path / "fetched")  # downloaded through the server
    assert champion.version == "1" and json.loads((champion.adapter_path / "adapter_config.json").read_text())["acc"] == 0.8
    assert any(stored.rglob("adapter_config.json"))  # the server stored the artifacts, not this process

    exported2, trained2, _ = records(tmp_path, 0.7)
    worse = EvalReport(n_examples=10, base=score(0.1), candidate=score(0.7), champion=score(0.8), champion_version="1",
                       predictions_path=exported2.directory.parent / "predictions.jsonl")
    second = register_candidate(context(tmp_path, url, cfg, "flow-2"), cfg, None, exported2, trained2, worse)
    assert not second.decision.promoted and second.version == "2"

    env = {**os.environ, "TUNELOOP_HOME": str(tmp_path / "home"), "MLFLOW_TRACKING_URI": url}  # from the environment
    out = subprocess.run([sys.executable, "-m", "tuneloop.app.cli", "models", "--json"],
                         cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    versions = json.loads(out.stdout)["versions"]
    assert [(v["version"], v["aliases"]) for v in versions] == [("1", ["champion"]), ("2", ["challenger"])]
