"""Real TRL + peft + torch on the tiny offline model (a few seconds each on CPU)."""

import json

import pytest

from conftest import DEMO, DEMO_CONFIG, gate_folder
from flows.config import load_config
from tasks.base_model import load_causal_lm, resolve_base_model
from tasks.evaluate import evaluate_models
from tasks.export import export_chat_jsonl
from tasks.heldout import read_heldout
from tasks.records import TuneloopError
from tasks.snapshot import write_snapshot
from tasks.train_local import train_lora

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    cfg = load_config(DEMO_CONFIG, ["evaluate.max_examples=40"])
    landing = root / "landing"
    landing.mkdir()
    (landing / "t.jsonl").write_text("".join((DEMO / "tickets.jsonl").read_text().splitlines(True)[:400]))
    checked = gate_folder(landing, cfg, root / "run")
    heldout = read_heldout(cfg.evaluate.holdout, cfg.mapping, cfg.evaluate.max_examples)
    exported = export_chat_jsonl(write_snapshot(checked, root / "datasets"), cfg.export, heldout, root / "exports")
    return root, cfg, exported, heldout


def test_training_lowers_the_loss_and_saves_a_loadable_adapter(workspace):
    root, cfg, exported, _ = workspace
    cfg.train.local.max_steps = 20
    trained = train_lora(exported, cfg.train, root / "models", root / "a")
    assert (trained.adapter_path / "adapter_config.json").is_file()
    assert (trained.adapter_path / "adapter_model.safetensors").is_file()
    assert json.loads((trained.adapter_path / "adapter_config.json").read_text())["r"] == cfg.train.local.lora.r
    losses = [loss for _, loss in trained.loss_history]
    assert len(losses) >= 2 and losses[-1] < losses[0]
    assert trained.steps == 20 and trained.dataset_version == exported.dataset_version


def test_untrained_adapter_answers_exactly_like_the_base(workspace):
    root, cfg, exported, heldout = workspace
    cfg.train.local.max_steps = 0
    trained = train_lora(exported, cfg.train, root / "models", root / "b")
    (root / "b").mkdir(exist_ok=True)
    report = evaluate_models(trained, None, heldout, cfg.evaluate, root / "b")
    assert report.candidate == report.base
    rows = [json.loads(line) for line in report.predictions_path.read_text().splitlines()]
    assert len(rows) == 40
    assert all(r["candidate"]["text"] == r["base"]["text"] for r in rows)


def test_tiny_base_model_is_built_once_and_reused(workspace):
    root, cfg, _, _ = workspace
    first = resolve_base_model(cfg.train, root / "models")
    mtime = (first / "config.json").stat().st_mtime_ns
    assert resolve_base_model(cfg.train, root / "models") == first
    assert (first / "config.json").stat().st_mtime_ns == mtime


def test_a_base_model_that_cannot_be_loaded_offline_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(TuneloopError, match=r"cannot load base model acme/no-such-model: .*HF_HUB_OFFLINE.*train\.base_model"):
        load_causal_lm("acme/no-such-model")
