"""What the benchmarks share: the model a ``--model`` names, the machine they ran on, and its GEMM peaks."""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def resolve_model(name: str | Path, models_dir: Path | None = None) -> Path:
    """A folder as is; a GGUF file (a path or ``package/file.gguf``) converted once, as a run converts it, into
    ``models_dir`` (default: the repository's state folder, where ``make demo-smollm2`` put it)."""
    from tuneloop.lib.base_model import convert_gguf, converted_gguf_folder, is_gguf, locate_gguf

    if not is_gguf(str(name)):
        return Path(name)
    gguf = locate_gguf(str(name))
    out = converted_gguf_folder(gguf, models_dir or Path(os.environ.get("TUNELOOP_HOME", ROOT / ".tuneloop")) / "models")
    if not out.is_dir():
        out.parent.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf, out)
    return out


def demo_examples() -> list[dict]:
    """The demo tickets as the pipeline renders them (system, user: subject and body; assistant: queue and
    reply), file order, each ``{"record_id", "messages"}``; the demo file's broken lines on purpose skipped."""
    import orjson

    from tuneloop.core.config import load_config
    from tuneloop.core.mapping import RecordMapper
    from tuneloop.core.records import RecordChunk

    cfg = load_config(ROOT / "deployments" / "demo.yaml")
    chunk = RecordChunk()
    for i, line in enumerate((ROOT / "data" / "demo" / "tickets.jsonl").read_bytes().splitlines()):
        try:
            row = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(row, dict):
            chunk.add(row, "tickets.jsonl", i + 1)
    out = []
    for raw in RecordMapper(cfg.mapping, cfg.quality).prepare(chunk).examples:
        ex = orjson.loads(raw)
        messages = ex["messages"]
        if messages and messages[-1]["role"] == "assistant" and all(m["content"] for m in messages):
            out.append({"record_id": ex["record_id"], "messages": messages})
    return out


def cpu_description() -> str:
    """The CPU model and the flags that decide its speed (AMX, AVX-512, AVX512-BF16), cores and threads."""
    import torch

    from tuneloop.lib.precision import cpu_flags

    name = platform.processor() or platform.machine()
    try:
        name = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    flags = sorted(f for f in cpu_flags() if f.startswith(("amx", "avx512f", "avx512_bf16", "avx2")))
    return (f"{name}, {os.cpu_count()} cpus, torch {torch.get_num_threads()} threads, flags "
            f"{' '.join(flags) or 'unknown'}, torch {torch.__version__}")


def gemm_peak_gflops(dtype_name: str, n: int = 2048, seconds: float = 3.0) -> float:
    """The best GFLOP/s of an n x n matmul in this dtype over ``seconds``: the ceiling MFU is measured
    against."""
    import torch

    dtype = getattr(torch, dtype_name)
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(2):
        a @ b
    best, end = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < end:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best / 1e9
