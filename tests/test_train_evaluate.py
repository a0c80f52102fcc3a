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


def test_a_champion_scored_before_is_not_generated_again_and_errors_are_listed(workspace, monkeypatch):
    import tasks.evaluate as ev
    from tasks.records import Champion

    root, cfg, exported, heldout = workspace
    cfg.train.local.max_steps = 5
    trained = train_lora(exported, cfg.train, root / "models", root / "c")
    cache = root / "generations"
    calls = []
    real = ev.generate
    monkeypatch.setattr(ev, "generate", lambda model, tok, exs, *a: calls.append(len(exs)) or real(model, tok, exs, *a))
    first = evaluate_models(trained, None, heldout, cfg.evaluate, root / "c", cache_dir=cache)
    assert sum(calls) == 2 * len(heldout) and first.cached_answers == 0

    calls.clear()  # next run: the same adapter is now the champion, a new candidate is scored beside it
    champion = Champion(version="1", adapter_path=trained.adapter_path, base_model=trained.base_model)
    cfg.train.local.max_steps = 6
    candidate = train_lora(exported, cfg.train, root / "models", root / "d")
    second = evaluate_models(candidate, champion, heldout, cfg.evaluate, root / "d", cache_dir=cache)
    assert sum(calls) == len(heldout)  # only the new candidate generated; base and champion came from the cache
    assert second.cached_answers == 2 * len(heldout)
    assert second.champion == first.candidate and second.base == first.base

    worst = second.worst["base"]  # the untrained base gets every label wrong
    assert len(worst) == cfg.evaluate.n_worst and {"record_id", "input", "expected", "got", "answer"} <= set(worst[0])
    assert json.loads((root / "d" / "worst_examples.json").read_text())["base"] == worst


def test_a_golden_set_is_evaluated_and_kept_out_of_training(tmp_path):
    from tasks.export import remove_heldout
    from tasks.heldout import read_evaluation_set
    from tasks.quality import content_hash
    from tasks.records import ChatExample

    golden = tmp_path / "golden.jsonl"
    rows = [json.loads(line) for line in (DEMO / "tickets.jsonl").read_text().splitlines()[:3]]
    golden.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(DEMO_CONFIG, ["evaluate.max_examples=5", f"evaluate.golden={golden}"])
    examples = read_evaluation_set(cfg.evaluate, cfg.mapping)
    assert len(examples) == 8 and [e.record_id for e in examples[5:]] == [f"golden:{r['ticket_id']}" for r in rows]
    train = [ChatExample(messages=[*e.prompt, {"role": "assistant", "content": e.expected}], record_id=e.record_id,
                         source="s", line=i, content_hash=content_hash([*e.prompt, {"role": "assistant", "content": e.expected}]))
             for i, e in enumerate(examples[5:])]
    clean, removed = remove_heldout(train, examples)
    assert clean == [] and removed == 3
    missing = load_config(DEMO_CONFIG, [f"evaluate.golden={tmp_path / 'nope.jsonl'}"])
    with pytest.raises(TuneloopError, match="evaluate.golden: .*nope.jsonl does not exist"):
        read_evaluation_set(missing.evaluate, missing.mapping)
