"""Shared fixtures. Everything runs offline and writes only under pytest's temporary folders."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before prefect, mlflow or transformers are imported by any test module.
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="tuneloop-tests-"))
os.environ.update({
    "TUNELOOP_HOME": str(_SESSION_HOME / "home"),
    "PREFECT_HOME": str(_SESSION_HOME / "prefect"),
    "DO_NOT_TRACK": "true",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "GX_ANALYTICS_ENABLED": "false",
    "HF_HUB_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "TOKENIZERS_PARALLELISM": "false",
})

for _leaky in ("MLFLOW_TRACKING_URI", "OPENAI_BASE_URL", "OPENAI_API_KEY", "AZURE_OPENAI_ENDPOINT", "PREFECT_API_URL"):
    os.environ.pop(_leaky, None)  # a developer's shell must not point the tests at real services

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo"
DEMO_CONFIG = ROOT / "deployments" / "demo.yaml"


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line if line.endswith("\n") else line + "\n" for line in lines), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _no_inherited_tracking_uri():
    """``mlflow.set_tracking_uri`` also sets $MLFLOW_TRACKING_URI: without this, a CLI child of a later test
    would inherit an earlier test's registry (and find its model versions) instead of its own state folder's."""
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    yield
    os.environ.pop("MLFLOW_TRACKING_URI", None)


@pytest.fixture
def demo_lines() -> list[str]:
    return (DEMO / "tickets.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)


@pytest.fixture
def home(tmp_path, monkeypatch) -> Path:
    """A fresh state folder for one test."""
    path = tmp_path / "state"
    monkeypatch.setenv("TUNELOOP_HOME", str(path))
    return path


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect server for the whole session (it takes ~12 s to start)."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def gate_folder(folder: Path, cfg, run_dir: Path, distill=None):
    """Collect everything in a folder (empty ledger) and run the quality gate over it (with ``distill``: records
    without an answer set aside for the teacher)."""
    from tuneloop.core.mapping import required_fields
    from tuneloop.lib.gate import check_batch
    from tuneloop.lib.ledger import Ledger
    from tuneloop.lib.sources import make_source

    raw = make_source(cfg.source, folder, required_fields(cfg.mapping, distill is not None and distill.teacher != "none")).collect(Ledger())
    return check_batch(raw, cfg.source, cfg.mapping, cfg.quality, run_dir, distill)


def demo_export(root: Path, n_lines: int, max_examples: int):
    """The first ``n_lines`` demo tickets through the gate, snapshot and export: (config, export, held-out)."""
    from tuneloop.core.config import load_config
    from tuneloop.lib.heldout import read_heldout
    from tuneloop.tasks.export import export_chat_jsonl
    from tuneloop.tasks.snapshot import write_snapshot

    cfg = load_config(DEMO_CONFIG, [f"evaluate.max_examples={max_examples}"])
    landing = root / "landing"
    landing.mkdir()
    (landing / "t.jsonl").write_text("".join((DEMO / "tickets.jsonl").read_text().splitlines(True)[:n_lines]))
    checked = gate_folder(landing, cfg, root / "run")
    heldout = read_heldout(cfg.evaluate.holdout, cfg.mapping, cfg.evaluate.max_examples)
    exported = export_chat_jsonl(write_snapshot(checked, root / "datasets"), cfg.export, heldout, root / "exports")
    return cfg, exported, heldout


def accepted(checked) -> dict:
    """Accepted examples by record id."""
    from tuneloop.core.records import ChatExample
    from tuneloop.lib.gate import read_accepted

    return {row["record_id"]: ChatExample.model_validate(row) for row in read_accepted(checked.accepted_path)}


