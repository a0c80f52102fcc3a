"""Which dtype the frozen base weights train in on a CPU.

A CPU with bf16 units (AVX512-BF16, AMX) multiplies bf16 matrices several times faster than fp32 ones (on the
2-core AMD EPYC this was written on, bench/train.py --model measured 850 against 197 GFLOP/s for a
2048-square GEMM). LoRA trains only the adapter, so the frozen base can be stored in bf16 while the adapter's
weights, its gradients and AdamW's state stay fp32 (PEFT upcasts adapter weights to fp32). A CPU without those units would emulate bf16, slower than
fp32, so the choice is read from the CPU's flags, never assumed.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

from tuneloop.core.config import TrainConfig

BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # Linux /proc/cpuinfo names


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux); empty where they cannot be read, which means fp32."""
    if not sys.platform.startswith("linux"):
        return frozenset()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split())
    return frozenset()


def cpu_bf16_units(flags: frozenset[str] | None = None) -> list[str]:
    """The bf16 units this CPU has (empty: none)."""
    flags = cpu_flags() if flags is None else flags
    return [f for f in BF16_FLAGS if f in flags]


def frozen_dtype(train: TrainConfig, use_cuda: bool, flags: frozenset[str] | None = None) -> tuple[str, str]:
    """("bfloat16" or "float32", why) for the frozen base weights on a CPU; on CUDA the weights stay fp32 and
    the Trainer's bf16 mixed precision applies (``cuda_bf16``)."""
    precision = train.local.precision
    if use_cuda:
        return "float32", "CUDA: fp32 weights, bf16 mixed precision where the GPU supports it"
    units = cpu_bf16_units(flags)
    if precision == "fp32":
        return "float32", "train.local.precision: fp32"
    if precision == "bf16":
        if not units:
            return "bfloat16", ("train.local.precision: bf16, though this CPU has no bf16 units (no "
                                f"{' or '.join(BF16_FLAGS)} flag): emulated, likely slower than fp32")
        return "bfloat16", f"train.local.precision: bf16 ({', '.join(units)})"
    if train.base_model == "tiny":
        return "float32", "the tiny model: its matrices are too small for bf16 to gain"
    if not units:
        return "float32", f"this CPU has no bf16 units (no {' or '.join(BF16_FLAGS)} flag)"
    return "bfloat16", f"this CPU has bf16 units ({', '.join(units)})"

