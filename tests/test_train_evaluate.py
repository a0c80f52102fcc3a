"""Real TRL + peft + torch on the tiny offline model (a few seconds each on CPU)."""

import json

import pytest

from conftest import DEMO, DEMO_CONFIG, demo_export
from tuneloop.core.config import load_config
from tuneloop.core.models import load_causal_lm
from tuneloop.core.records import TuneloopError
from tuneloop.lib.base_model import resolve_base_model
from tuneloop.tasks.evaluate import evaluate_models
from tuneloop.tasks.train_local import train_lora

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("train")
    cfg, exported, heldout = demo_export(root, 400, 40)
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


def test_answers_are_long_enough_for_every_label_the_references_write(workspace):
    """The drift scenario's bug: `queue: hub` is 10 tokens for the tiny tokenizer, 8 cut it to `queue: h`."""
    import re

    from tuneloop.core.models import load_tokenizer
    from tuneloop.lib.metrics import answer_budget

    root, cfg, exported, heldout = workspace
    cfg.train.local.max_steps = 0
    trained = train_lora(exported, cfg.train, root / "models", root / "budget")
    tokenizer = load_tokenizer(trained.adapter_path)
    count = lambda texts: [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]  # noqa: E731
    hub = heldout[0].model_copy(update={"label": "hub", "expected": "queue: hub\nThanks, re-pair the Hub."})
    held = [*heldout[:9], hub]
    need = count(["queue: hub"])[0]
    assert need > count(["queue: billing"])[0]  # a new word is spelled out in pieces
    pattern = re.compile(cfg.evaluate.label_pattern, re.MULTILINE)

    warnings: list[str] = []
    short = cfg.evaluate.model_copy(update={"max_new_tokens": 3})
    assert answer_budget(held, short, pattern, [count], warnings.append) == need + 2
    assert "max_new_tokens=3" in warnings[0] and "'hub'" in warnings[0]
    unset = cfg.evaluate.model_copy(update={"max_new_tokens": None})
    assert answer_budget(held, unset, pattern, [count]) == need + 2
    generous = cfg.evaluate.model_copy(update={"max_new_tokens": 40})
    assert answer_budget(held, generous, pattern, [count], warnings.append) == 40 and len(warnings) == 1
    generation = cfg.evaluate.model_copy(update={"task": "generation", "max_new_tokens": None})
    assert answer_budget(held, generation, pattern, [count]) == max(count([h.expected for h in held])) + 1

    report = evaluate_models(trained, None, held, short, root / "budget", warn=warnings.append)
    assert report.max_new_tokens == need + 2 and len(warnings) == 2


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
    import tuneloop.lib.answerers as answerers
    from tuneloop.core.records import Champion

    root, cfg, exported, heldout = workspace
    cfg.train.local.max_steps = 5
    trained = train_lora(exported, cfg.train, root / "models", root / "c")
    cache = root / "generations"
    calls = []
    real = answerers.generate
    monkeypatch.setattr(answerers, "generate", lambda model, tok, exs, *a: calls.append(len(exs)) or real(model, tok, exs, *a))
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
    from tuneloop.core.mapping import content_hash
    from tuneloop.core.records import ChatExample
    from tuneloop.lib.heldout import read_evaluation_set
    from tuneloop.tasks.export import remove_heldout

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


def test_loss_is_on_assistant_tokens_only(workspace):
    """Decode the supervised tokens of one real batch: the answers, never the ticket or the system prompt."""
    from tuneloop.lib.lora import build_trainer

    root, cfg, exported, _ = workspace
    cfg.train.local.max_steps = 1
    trainer, tok, _ = build_trainer(exported, cfg.train, root / "models", root / "mask")
    batch = next(iter(trainer.get_train_dataloader()))
    assert (batch["labels"] == -100).any() and (batch["labels"] != -100).any()
    for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist(), strict=True):
        trained = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != -100])
        assert trained.lstrip().startswith("queue: "), trained
        assert "Subject:" not in trained and "Lumenfold's help desk" not in trained
        assert "Subject:" in tok.decode(ids)  # the ticket is in the input, just not trained on



def test_packed_examples_share_a_row_but_not_their_attention(workspace):
    """Packing puts several examples in one unpadded row; each must still see only itself."""
    import torch

    from tuneloop.lib.lora import build_trainer

    root, cfg, exported, _ = workspace
    cfg.train.local.max_steps = 1
    assert cfg.train.local.packing  # on by default
    trainer, _, _ = build_trainer(exported, cfg.train, root / "models", root / "packed")
    rows = []
    for batch in trainer.get_train_dataloader():
        assert "attention_mask" not in batch or batch["attention_mask"] is None  # padding-free
        ids, pos = batch["input_ids"][:1], batch["position_ids"][:1]
        starts = [i for i, p in enumerate(pos[0].tolist()) if p == 0] + [ids.shape[1]]
        rows.append(len(starts) - 1)
        if len(starts) > 3:
            break
    assert max(rows) >= 3, f"packed rows should hold several examples, got {rows}"
    model = trainer.model.eval()
    with torch.no_grad():
        packed = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        for a, b in zip(starts, starts[1:], strict=False):
            alone = model(input_ids=ids[:, a:b], use_cache=False).logits
            assert torch.allclose(packed[:, a:b], alone, atol=1e-4), f"example at {a}:{b} attended across its row"


CHILD = """
import sys
sys.path.insert(0, {root!r})
from pathlib import Path
from tuneloop.core.config import load_config
from tuneloop.core.records import ExportedDataset
from tuneloop.tasks.train_local import train_lora
cfg = load_config({config!r}, {overrides!r})
exported = ExportedDataset.model_validate_json(Path({exported!r}).read_text())
train_lora(exported, cfg.train, Path({models!r}), Path({out!r}), Path({ckpt!r}))
"""


def test_a_killed_training_resumes_from_its_last_checkpoint(workspace, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from conftest import ROOT

    root, _, exported, _ = workspace
    overrides = ["train.local.max_steps=40", "train.local.eval_every=5", "train.local.batch_size=4",
                 "train.local.warmup_steps=0"]
    (tmp_path / "exported.json").write_text(exported.model_dump_json())
    ckpt = tmp_path / "checkpoints"
    code = CHILD.format(root=str(ROOT), config=str(DEMO_CONFIG), overrides=overrides, exported=str(tmp_path / "exported.json"),
                        models=str(root / "models"), out=str(tmp_path / "killed"), ckpt=str(ckpt))
    child = subprocess.Popen([sys.executable, "-c", code], start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and not list(ckpt.glob("*/checkpoint-10/adapter_model.safetensors")):
        assert child.poll() is None, "training ended before it could be killed"
        time.sleep(0.2)
    time.sleep(0.5)
    os.killpg(child.pid, signal.SIGKILL)
    child.wait()
    saved = sorted(int(p.name.split("-")[1]) for p in ckpt.glob("*/checkpoint-*"))
    assert saved and max(saved) < 40

    cfg = load_config(DEMO_CONFIG, overrides)
    trained = train_lora(exported, cfg.train, root / "models", tmp_path / "resumed", ckpt)
    assert trained.resumed_from_step == max(saved) >= 10  # not from step 0
    assert trained.loss_history[0][0] < trained.resumed_from_step  # the history before the kill is kept
    assert (trained.adapter_path / "adapter_model.safetensors").is_file()
    assert (trained.artifacts_dir / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"
    assert trained.tokens_per_second and trained.peak_memory_mb

    again = train_lora(exported, cfg.train, root / "models", tmp_path / "again", ckpt)
    assert again.resumed_from_step == 40 and again.train_seconds == 0.0  # finished: nothing to redo
    assert again.adapter_path == tmp_path / "again" / "adapter" and (again.artifacts_dir / "loss_curve.png").is_file()
    assert (again.adapter_path / "adapter_model.safetensors").read_bytes() == \
        (trained.adapter_path / "adapter_model.safetensors").read_bytes()


def test_qlora_is_refused_without_cuda(workspace):
    import torch

    root, cfg, exported, _ = workspace
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: 4-bit loading is allowed here")
    cfg4 = load_config(DEMO_CONFIG, ["train.local.quantization=4bit", "train.local.max_steps=2"])
    with pytest.raises(TuneloopError, match="4bit .*needs a CUDA GPU"):
        train_lora(exported, cfg4.train, root / "models", root / "q")


def test_two_cpu_processes_train_one_adapter_with_ddp(workspace, tmp_path):
    """train.local.devices: 2 runs torchrun with two gloo ranks; both train on their own shard, rank 0 saves."""
    root, _, exported, _ = workspace
    cfg = load_config(DEMO_CONFIG, ["train.local.max_steps=4", "train.local.batch_size=2", "train.local.devices=2"])
    trained = train_lora(exported, cfg.train, root / "models", tmp_path / "ddp")
    ranks = [json.loads((trained.artifacts_dir / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and {r["backend"] for r in ranks} == {"gloo"}
    assert [r["global_step"] for r in ranks] == [4, 4]
    assert ranks[0]["first_batch_sha256"] != ranks[1]["first_batch_sha256"]  # each rank had its own shard
    assert trained.devices == 2 and len(trained.loss_history) == 4 and trained.tokens_per_second
    assert sorted(p.name for p in trained.adapter_path.glob("adapter_model*")) == ["adapter_model.safetensors"]
    model = load_causal_lm(trained.adapter_path)  # one adapter, loadable on its own
    assert model is not None

    fsdp = load_config(DEMO_CONFIG, ["train.local.max_steps=2", "train.local.devices=2",
                                     "train.local.distributed=fsdp"])
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(TuneloopError, match="fsdp shards the model over GPUs"):
            train_lora(exported, fsdp.train, root / "models", tmp_path / "fsdp")


def test_a_warm_start_continues_the_champions_adapter_only_when_it_fits(workspace):
    """init_from: champion trains the champion's adapter further; another base or LoRA shape starts fresh."""
    from safetensors.torch import load_file

    from tuneloop.core.records import Champion
    from tuneloop.tasks.train_local import checkpoint_key, warm_start_adapter, warm_start_refusal

    root, cfg, exported, _ = workspace
    cfg.train.local.max_steps = 5
    champion_adapter = train_lora(exported, cfg.train, root / "models", root / "warm-champion").adapter_path
    base = str(resolve_base_model(cfg.train, root / "models"))
    champion = Champion(version="3", adapter_path=champion_adapter, base_model=base)

    assert warm_start_adapter(champion, cfg.train, root / "models") is None  # init_from: base (the default)
    warm = cfg.train.model_copy(deep=True)
    warm.local.init_from = "champion"
    assert warm_start_adapter(None, warm, root / "models") is None  # no champion yet
    assert warm_start_adapter(champion, warm, root / "models") == champion_adapter
    other_shape = warm.model_copy(deep=True)
    other_shape.local.lora.r = 8
    assert warm_start_refusal(champion_adapter, other_shape, base, base) == "the LoRA settings changed (r 16 -> 8)"
    assert warm_start_adapter(champion, other_shape, root / "models") is None
    assert "another base model" in warm_start_refusal(champion_adapter, warm, "acme/other-base", base)
    assert checkpoint_key(exported, warm, champion_adapter) != checkpoint_key(exported, warm)

    # One step at a vanishing learning rate: a warm start ends where the champion ended, a fresh one at LoRA's
    # initialisation (B = 0), so the first candidate of a warm-started retrain is the champion, not the base.
    warm.local.max_steps, warm.local.learning_rate, warm.local.warmup_steps = 1, 1e-12, 0
    continued = train_lora(exported, warm, root / "models", root / "warm", init_adapter=champion_adapter)
    fresh = train_lora(exported, warm, root / "models", root / "fresh")
    before = load_file(champion_adapter / "adapter_model.safetensors")
    after = load_file(continued.adapter_path / "adapter_model.safetensors")
    lora_b = [k for k in before if "lora_B" in k]
    assert lora_b and any(before[k].abs().max() > 1e-3 for k in lora_b)
    assert all((after[k] - before[k]).abs().max() < 1e-6 for k in before)
    assert all(t.abs().max() < 1e-6 for k, t in load_file(fresh.adapter_path / "adapter_model.safetensors").items()
               if "lora_B" in k)


def test_the_budget_follows_the_data_and_the_best_checkpoint_by_validation_loss_is_kept(workspace, tmp_path):
    """epochs, not a fixed step count; validation loss at each evaluation; early stopping; the adapter saved is
    the checkpoint with the lowest validation loss, not the last one."""
    import math

    import torch
    from safetensors.torch import load_file

    from tuneloop.lib.lora import build_trainer

    root, cfg, exported, _ = workspace
    one_epoch = load_config(DEMO_CONFIG, ["train.local.epochs=1", "train.local.batch_size=4",
                                          "train.local.progress_every=7"])
    trainer, _, _ = build_trainer(exported, one_epoch.train, root / "models", tmp_path / "probe")
    rows = len(trainer.train_dataset)
    trained = train_lora(exported, one_epoch.train, root / "models", tmp_path / "one", tmp_path / "ckpt")
    assert trained.steps == math.ceil(rows / 4) and trained.epochs == pytest.approx(1.0, abs=0.01)
    # the loss of every step (loss/train), so "loss at the last step" is the last step's, whatever progress_every
    assert [step for step, _ in trained.loss_history] == list(range(1, trained.steps + 1))
    assert trained.train_loss == trained.loss_history[-1][1] and trained.steps % one_epoch.train.local.progress_every
    evals = trained.step_metrics["eval_loss"]
    assert len(evals) >= 9 and all(v > 0 for _, v in evals)  # ten times over the run

    # a learning rate far too high: the validation loss stops improving, training stops after 1 more evaluation
    wild = load_config(DEMO_CONFIG, ["train.local.max_steps=60", "train.local.eval_every=3", "train.local.batch_size=4",
                                     "train.local.learning_rate=0.8", "train.local.warmup_steps=0",
                                     "train.local.early_stopping_patience=1"])
    # on one thread: a run this wild is chaotic, and how an earlier test left torch's thread pool (e.g. a
    # set_num_threads round trip) changes the float sums enough to decide whether it ever improves again
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        stopped = train_lora(exported, wild.train, root / "models", tmp_path / "wild", tmp_path / "ckpt")
    finally:
        torch.set_num_threads(threads)
    evals = stopped.step_metrics["eval_loss"]
    best_step, best = min(evals, key=lambda e: e[1])
    assert stopped.stopped_early and stopped.steps < 60
    assert stopped.best_step == best_step and stopped.step_metrics["best_eval_loss"] == [(best_step, best)]
    assert not evals[-1][1] < best and stopped.steps == evals[-1][0]  # no better (NaN, diverged, is no better)
    kept = load_file(stopped.adapter_path / "adapter_model.safetensors")
    ckpt = next((tmp_path / "ckpt").glob(f"*/checkpoint-{best_step}"))
    at_best = load_file(ckpt / "adapter_model.safetensors")
    assert kept.keys() == at_best.keys() and all((kept[k] == at_best[k]).all() for k in kept)
    rerun = train_lora(exported, wild.train, root / "models", tmp_path / "wild-again", tmp_path / "ckpt")
    assert rerun.steps == stopped.steps and rerun.best_step == best_step and rerun.train_seconds == 0.0
