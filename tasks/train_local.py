"""Local backend: a LoRA adapter trained on the export, here or on several devices of this machine.

This stage decides what training is needed: none (a finished copy of the same training exists:
``lib/checkpoints.py``), a resume from the last whole checkpoint, or a run from step 0, in this process
(``lib/lora.py``, TRL's SFTTrainer) or under torchrun (``lib/torchrun.py``). Checkpoints go to a folder
keyed by (dataset version, training config, warm-start adapter), so a rerun after a crash resumes instead
of starting over. A warm start continues the champion's adapter when it was trained on the same base.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import orjson
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tuneloop.core.config import TrainConfig
from tuneloop.core.models import adapter_identity
from tuneloop.core.records import Champion, ExportedDataset, LocalAdapter
from tuneloop.lib.base_model import resolve_base_model
from tuneloop.lib.checkpoints import finished_training, last_complete_checkpoint, mark_finished
from tuneloop.lib.lora import train_here, untrained_adapter
from tuneloop.lib.runlog import stage_logger
from tuneloop.lib.torchrun import launch_distributed


def checkpoint_key(exported: ExportedDataset, train: TrainConfig, init_adapter: Path | None = None) -> str:
    """Same data, same base, same settings, same starting adapter: the same training, so it can be resumed."""
    # Where it trains and how often it reports do not change the training: a pool retry resumes inline too.
    settings = train.model_dump_json(include={"base_model", "tiny", "local"},
                                     exclude={"local": {"placement", "deployment", "progress_every"}})
    if init_adapter is not None:
        settings += adapter_identity(str(train.base_model), init_adapter)
    # the split trained and validated on (another export seed, held-out set or length policy is another training)
    settings += "|".join(f"{name}={digest}" for name, digest in sorted(exported.sha256.items()))
    return f"{exported.dataset_version}-{hashlib.sha256(settings.encode()).hexdigest()[:12]}"


def warm_start_refusal(adapter: Path, train: TrainConfig, trained_on: str, base_model: str) -> str | None:
    """Why this adapter cannot be trained further under this config (None: it can).

    Continuing an adapter only makes sense on the base it was trained on and in the LoRA shape the config
    asks for; otherwise the run starts from a fresh adapter and says why.
    """
    config_path = adapter / "adapter_config.json"
    if not config_path.is_file():
        return f"{adapter} holds no adapter_config.json"
    if trained_on != base_model:
        return f"it was trained on another base model ({trained_on}, now {base_model})"
    found = orjson.loads(config_path.read_bytes())
    lora = train.local.lora
    differs = [f"{k} {found.get(k)} -> {v}" for k, v in (("r", lora.r), ("lora_alpha", lora.alpha))
               if found.get(k) != v]
    if lora.target_modules != "all-linear" and sorted(found.get("target_modules") or []) != sorted(lora.target_modules):
        differs.append(f"target_modules {found.get('target_modules')} -> {lora.target_modules}")
    return "the LoRA settings changed (" + ", ".join(differs) + ")" if differs else None


def warm_start_adapter(champion: Champion | None, train: TrainConfig, models_dir: Path) -> Path | None:
    """The adapter a retrain continues from (``train.local.init_from: champion``), or None for a fresh one.

    Retraining from scratch each time spends most steps relearning what the champion knows; continuing from
    the champion spends them on what changed, and keeps one run's luck from undoing the last one's.
    """
    if not train.warm_starts:
        return None
    log = stage_logger()
    if champion is None or champion.adapter_path is None:
        log.info("train: init_from champion, but " + ("there is no champion yet" if champion is None else
                 f"champion v{champion.version} is not a local adapter") + ": starting from a fresh adapter")
        return None
    why = warm_start_refusal(champion.adapter_path, train, champion.base_model,
                             str(resolve_base_model(train, models_dir)))
    if why:
        log.warning(f"train: cannot continue champion v{champion.version}'s adapter: {why}; starting from a fresh one")
        return None
    log.info(f"train: warm start from champion v{champion.version}'s adapter")
    return champion.adapter_path


def train_lora(exported: ExportedDataset, train: TrainConfig, models_dir: Path, out_dir: Path,
               checkpoints_dir: Path | None = None, init_adapter: Path | None = None) -> LocalAdapter:
    """A LoRA adapter trained on the export: a fresh one, or ``init_adapter`` trained further (a warm start)."""
    local = train.local
    out_dir.mkdir(parents=True, exist_ok=True)
    if local.max_steps == 0:
        return untrained_adapter(exported, train, models_dir, out_dir, init_adapter)
    checkpoint_dir = (checkpoints_dir or out_dir / "checkpoints") / checkpoint_key(exported, train, init_adapter)
    if (finished := finished_training(checkpoint_dir, out_dir)) is not None:
        return finished
    resume = last_complete_checkpoint(checkpoint_dir)  # checked here, once, before any rank looks
    if local.devices > 1:
        trained = launch_distributed(exported, train, models_dir, out_dir, checkpoint_dir, init_adapter, resume)
    else:
        trained = train_here(exported, train, models_dir, out_dir, checkpoint_dir, init_adapter, resume)
    mark_finished(trained, checkpoint_dir)
    return trained


def loss_summary(trained: LocalAdapter) -> str:
    """The last step's loss, and the mean over training beside it, named (one is not the other)."""
    if trained.train_loss is None:
        return "no loss logged"
    mean = f" (mean over training {trained.mean_train_loss:.4f})" if trained.mean_train_loss is not None else ""
    return f"loss at the last step {trained.train_loss:.4f}{mean}"


@task(name="warm-start", cache_policy=NO_CACHE)
def warm_start_task(champion: Champion | None, train: TrainConfig, models_dir: Path) -> Path | None:
    return warm_start_adapter(champion, train, models_dir)


@task(name="train", cache_policy=NO_CACHE)
def train_task(exported: ExportedDataset, train: TrainConfig, models_dir: Path, out_dir: Path,
               checkpoints_dir: Path | None = None, init_adapter: Path | None = None) -> LocalAdapter:
    trained = train_lora(exported, train, models_dir, out_dir, checkpoints_dir, init_adapter)
    resumed = f" (resumed from step {trained.resumed_from_step})" if trained.resumed_from_step else ""
    get_run_logger().info(f"train: {trained.steps} steps in {trained.train_seconds:.1f}s{resumed}; {loss_summary(trained)}; "
                          f"{trained.tokens_per_second} tokens/s, peak {trained.peak_memory_mb} MB")
    return trained
