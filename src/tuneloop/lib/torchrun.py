"""Training on several devices of one machine: the same training under torchrun, one process per device.

The launcher writes a spec, starts ``python -m torch.distributed.run ... -m tuneloop.lib.torchrun SPEC`` and
reads back the record rank 0 wrote; each rank runs ``lib.lora.train_here``. A failing rank's one-line
reason is what the error shows, not torchrun's wall of output.
"""

from __future__ import annotations

import sys
from pathlib import Path

import orjson

from tuneloop.core.config import TrainConfig
from tuneloop.core.records import ExportedDataset, LocalAdapter, TuneloopError
from tuneloop.lib.base_model import resolve_base_model
from tuneloop.lib.lora import train_here
from tuneloop.lib.runlog import stage_logger


def launch_distributed(exported: ExportedDataset, train: TrainConfig, models_dir: Path, out_dir: Path,
                        checkpoint_dir: Path, init_adapter: Path | None = None,
                        resume: Path | None = None) -> LocalAdapter:
    """The same training under torchrun, one process per device; rank 0 writes the result this process reads."""
    import collections
    import subprocess

    import torch

    log = stage_logger()
    if train.local.distributed == "fsdp" and not torch.cuda.is_available():
        raise TuneloopError("train.local.distributed: fsdp shards the model over GPUs and this machine has no CUDA; "
                            "use distributed: ddp to train with several CPU processes")
    if torch.cuda.is_available() and train.local.devices > torch.cuda.device_count():
        raise TuneloopError(f"train.local.devices: {train.local.devices} but this machine has "
                            f"{torch.cuda.device_count()} GPU(s)")
    # Build or check the base once here, so the ranks do not race to build the tiny model or fail one by one.
    base = resolve_base_model(train, models_dir, stage_logger())
    spec = out_dir / "distributed.json"
    result_path = out_dir / "trained.json"
    result_path.unlink(missing_ok=True)
    spec.write_bytes(orjson.dumps({
        "exported": exported.model_dump(mode="json"),
        "train": train.model_copy(update={"base_model": str(base)}).model_dump(mode="json"),
        "models_dir": str(models_dir), "out_dir": str(out_dir), "checkpoint_dir": str(checkpoint_dir),
        "result": str(result_path), "init_adapter": str(init_adapter) if init_adapter else None,
        "resume": str(resume) if resume else None,
    }))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={train.local.devices}",
           "-m", "tuneloop.lib.torchrun", str(spec)]
    log.info(f"train: launching {train.local.devices} processes ({train.local.distributed}) with torchrun")
    tail: collections.deque[str] = collections.deque(maxlen=15)
    failures: list[str] = []
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            tail.append(line.rstrip())
            if " failed: " in line and line.startswith("train: rank"):
                failures.append(line.strip())
            elif line.startswith("train: "):
                log.info(line.rstrip())
    if proc.returncode != 0 or not result_path.is_file():
        detail = "\n".join(failures or tail)
        raise TuneloopError(f"train: distributed training on {train.local.devices} processes failed "
                            f"(exit {proc.returncode}); last output:\n{detail}")
    trained = LocalAdapter.model_validate_json(result_path.read_bytes())
    return trained.model_copy(update={"base_model": str(base)})



def worker_main(spec_path: str) -> None:
    """Entry point of one torchrun rank."""
    import logging

    spec = orjson.loads(Path(spec_path).read_bytes())
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    train = TrainConfig.model_validate(spec["train"])
    try:
        trained = train_here(ExportedDataset.model_validate(spec["exported"]), train, Path(spec["models_dir"]),
                              Path(spec["out_dir"]), Path(spec["checkpoint_dir"]),
                              Path(spec["init_adapter"]) if spec.get("init_adapter") else None,
                              Path(spec["resume"]) if spec.get("resume") else None)
    except Exception as exc:
        import os
        import traceback

        traceback.print_exc()
        message = str(exc).splitlines()[0] if str(exc) else ""
        print(f"train: rank {os.environ.get('RANK', '?')} failed: {type(exc).__name__}: {message}", flush=True)
        raise SystemExit(1) from None
    if trained is not None:
        Path(spec["result"]).write_text(trained.model_dump_json())


if __name__ == "__main__":
    worker_main(sys.argv[1])
