"""The frozen base weights train in bf16 only on a CPU with bf16 units, the adapter and optimizer stay fp32, and
the loss follows fp32's within 1%."""

from __future__ import annotations

import pytest

from conftest import DEMO_CONFIG, demo_export
from tuneloop.core.config import load_config
from tuneloop.lib.precision import cpu_bf16_units, frozen_dtype

AVX512_BF16 = frozenset({"fpu", "avx512f", "avx512_bf16"})
AMX = frozenset({"avx512f", "amx_tile", "amx_bf16"})
OLD = frozenset({"fpu", "sse4_2", "avx2"})  # no bf16 units: bf16 would be emulated


def _train(base_model: str = "Qwen/Qwen2.5-0.5B-Instruct", precision: str = "auto"):
    return load_config(DEMO_CONFIG, [f"train.base_model={base_model}", f"train.local.precision={precision}"]).train


def test_bf16_is_chosen_only_where_the_cpu_has_bf16_units():
    assert cpu_bf16_units(AVX512_BF16) == ["avx512_bf16"] and cpu_bf16_units(AMX) == ["amx_bf16"]
    assert frozen_dtype(_train(), False, AVX512_BF16)[0] == "bfloat16"
    assert frozen_dtype(_train(), False, AMX)[0] == "bfloat16"
    dtype, why = frozen_dtype(_train(), False, OLD)
    assert dtype == "float32" and "no bf16 units" in why
    assert frozen_dtype(_train(), False, frozenset())[0] == "float32"  # flags unreadable (not Linux): fp32
    assert frozen_dtype(_train(precision="fp32"), False, AMX)[0] == "float32"
    assert frozen_dtype(_train("tiny"), False, AMX)[0] == "float32"  # too small to gain
    dtype, why = frozen_dtype(_train(precision="bf16"), False, OLD)
    assert dtype == "bfloat16" and "emulated" in why  # forced: allowed, and said
    assert frozen_dtype(_train(), True, AMX)[0] == "float32"  # CUDA: the Trainer's mixed precision instead


@pytest.mark.slow
def test_bf16_frozen_weights_keep_an_fp32_adapter_and_follow_the_fp32_loss(tmp_path):
    import torch

    from tuneloop.lib.lora import build_trainer

    cfg, exported, _ = demo_export(tmp_path, 300, 10)
    losses, trainers = {}, {}
    for precision in ("fp32", "bf16"):
        train = cfg.train.model_copy(deep=True)
        train.local.precision, train.local.max_steps, train.local.eval_every = precision, 6, 100
        trainer, _, _ = build_trainer(exported, train, tmp_path / "models", tmp_path / precision)
        trainer.train()
        losses[precision] = [e["loss"] for e in trainer.state.log_history if "loss" in e]
        trainers[precision] = trainer
    params = dict(trainers["bf16"].model.named_parameters())
    trained = {n: p.dtype for n, p in params.items() if p.requires_grad}
    frozen = {p.dtype for p in params.values() if not p.requires_grad}
    assert trained and set(trained.values()) == {torch.float32}, trained  # adapter in fp32
    assert frozen == {torch.bfloat16}
    assert {p.dtype for p in trainers["fp32"].model.parameters()} == {torch.float32}
    assert len(losses["fp32"]) == len(losses["bf16"]) == 6
    print("per-step loss, fp32:", losses["fp32"], "bf16:", losses["bf16"])
    for a, b in zip(losses["fp32"], losses["bf16"], strict=True):
        assert abs(a - b) <= 0.01 * a, (losses["fp32"], losses["bf16"])  # seen: within 0.2%
    assert losses["bf16"][-1] < losses["bf16"][0]  # and it learns
