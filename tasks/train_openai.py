"""OpenAI backend: fine-tune through the fine-tuning API of OpenAI, Azure OpenAI or a compatible endpoint.

A job costs money and hours, so this module never starts the same job twice and never loses one:

* The SDK retries POSTs without an idempotency key; a 500 after the server created a job would create a
  second, billed job. Every call here goes through ``core.openai_client.call`` with the SDK's retries off,
  and before each create (the first and every retry) the job is looked up by a key in its metadata and
  reattached.
* The job id is also written to the state folder as soon as it exists, so a rerun after the process was
  killed finds it even where an endpoint ignores the metadata filter.
* Uploaded files are reused by sha256 (and checked to still exist).

The API key comes from the environment or a Prefect Secret block and is scrubbed from every message.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tuneloop.core.config import OpenAITrainConfig, TrainConfig
from tuneloop.core.openai_client import Secrets, call, make_client
from tuneloop.core.records import ApiModel, ExportedDataset, TuneloopError
from tuneloop.core.state import write_atomically
from tuneloop.lib.credentials import api_key
from tuneloop.lib.run_context import RunContext
from tuneloop.lib.runlog import stage_logger

TERMINAL = ("succeeded", "failed", "cancelled")
KEY = "tuneloop_key"


def _warn(message: str) -> None:
    """Retry warnings to the run log (looked up at the retry, so a call outside a run logs plainly)."""
    stage_logger().warning(message)


class _Registry:
    """A small JSON map in the state folder (uploaded files by sha256, jobs by key), written atomically."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = orjson.loads(path.read_bytes()) if path.is_file() else {}

    def get(self, key: str) -> Any:
        return self.data.get(key)

    def put(self, key: str, value: Any) -> None:
        self.data[key] = value
        write_atomically(self.path, orjson.dumps(self.data, option=orjson.OPT_INDENT_2))


def upload(client, path: Path, sha256: str, files: _Registry, cfg: OpenAITrainConfig, secrets: Secrets,
           sleep: Callable[[float], None] = time.sleep) -> str:
    """The file's id on the service: reused when this content was uploaded before and still exists."""
    import openai

    log = stage_logger()
    known = files.get(sha256)
    if known:
        try:
            found = call(lambda: client.files.retrieve(known), f"files.retrieve {known}", cfg, secrets, sleep,
                         warn=_warn)
            if found.status != "error":
                log.info(f"openai: reusing uploaded {path.name} as {known} (same sha256)")
                return known
        except (TuneloopError, openai.NotFoundError):
            pass
    with path.open("rb") as fh:
        created = call(lambda: client.files.create(file=(path.name, fh.read()), purpose="fine-tune"),
                        f"upload {path.name}", cfg, secrets, sleep, warn=_warn)
    for _ in range(600):
        if created.status == "processed":
            break
        if created.status == "error":
            raise TuneloopError(f"openai: {path.name} was rejected: {secrets.scrub(str(created.status_details))}")
        sleep(1.0)
        created = call(lambda c=created.id: client.files.retrieve(c), f"files.retrieve {created.id}", cfg, secrets,
                       sleep, warn=_warn)
    files.put(sha256, created.id)
    log.info(f"openai: uploaded {path.name} as {created.id}")
    return created.id


def job_key(exported: ExportedDataset, cfg: OpenAITrainConfig) -> str:
    """What makes two jobs the same job: the same files and the same training settings."""
    settings = cfg.model_dump(include={"model", "suffix", "seed", "batch_size", "learning_rate_multiplier", "n_epochs"})
    raw = orjson.dumps([exported.sha256, settings], option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(raw).hexdigest()[:32]


def find_job(client, key: str, jobs: _Registry, cfg: OpenAITrainConfig, secrets: Secrets,
             sleep: Callable[[float], None] = time.sleep):
    """A live or finished job for this key (recorded here, or found by metadata), never a failed one."""
    import openai

    recorded = jobs.get(key)
    if recorded:
        try:
            job = call(lambda: client.fine_tuning.jobs.retrieve(recorded), f"jobs.retrieve {recorded}", cfg, secrets,
                       sleep, warn=_warn)
            if job.status not in ("failed", "cancelled"):
                return job
        except (TuneloopError, openai.NotFoundError):
            pass
    page = call(lambda: client.fine_tuning.jobs.list(metadata={KEY: key}, limit=20), "jobs.list", cfg, secrets, sleep,
                warn=_warn)
    for job in page.data:  # some endpoints ignore the filter: check the metadata here too
        if (job.metadata or {}).get(KEY) == key and job.status not in ("failed", "cancelled"):
            return job
    return None


def create_job_once(client, exported: ExportedDataset, train_file: str, validation_file: str | None,
                    cfg: OpenAITrainConfig, metadata: dict[str, str], jobs: _Registry, secrets: Secrets,
                    sleep: Callable[[float], None] = time.sleep):
    """Create the job; between our retries of the create, look for it first (a retried POST may have made it).
    The caller has already looked for an existing job before uploading."""
    key = metadata[KEY]
    hyper = {"n_epochs": cfg.n_epochs, "batch_size": cfg.batch_size,
             "learning_rate_multiplier": cfg.learning_rate_multiplier}
    request = dict(model=cfg.model, training_file=train_file, metadata=metadata,
                   method={"type": "supervised", "supervised": {"hyperparameters": hyper}})
    if validation_file:
        request["validation_file"] = validation_file
    if cfg.suffix:
        request["suffix"] = cfg.suffix
    if cfg.seed is not None:
        request["seed"] = cfg.seed
    job = call(lambda: client.fine_tuning.jobs.create(**request), "jobs.create", cfg, secrets, sleep,
                before_retry=lambda: find_job(client, key, jobs, cfg, secrets, sleep), warn=_warn)
    jobs.put(key, job.id)
    stage_logger().info(f"openai: job {job.id} on {cfg.model} ({job.status})")
    return job


def poll_job(client, job, cfg: OpenAITrainConfig, secrets: Secrets,
             on_metrics: Callable[[int, dict[str, float]], None] | None = None,
             sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic):
    """Until a terminal status; new events to the log as they arrive, metric events to ``on_metrics``."""
    log = stage_logger()
    seen: set[str] = set()
    interval = cfg.poll_seconds
    paused_since: float | None = None
    job_id = job.id
    while True:
        job = call(lambda: client.fine_tuning.jobs.retrieve(job_id), f"jobs.retrieve {job_id}", cfg, secrets, sleep,
                   warn=_warn)
        events = call(lambda: client.fine_tuning.jobs.list_events(job_id, limit=100), "jobs.list_events",
                       cfg, secrets, sleep, warn=_warn)
        fresh = [e for e in reversed(events.data) if e.id not in seen]
        for event in fresh:
            seen.add(event.id)
            if event.type == "metrics" and on_metrics is not None and isinstance(event.data, dict):
                data = {k: float(v) for k, v in event.data.items() if isinstance(v, int | float) and k != "step"}
                on_metrics(int(event.data.get("step", 0)), data)
            log.info(f"openai {job.id}: {secrets.scrub(event.message)}")
        if job.status == "succeeded":
            return job
        if job.status == "failed":  # an ``error: {}`` on a job that has not failed is no failure
            err = job.error
            code = getattr(err, "code", None) or "unknown_error"
            message = getattr(err, "message", None) or "no message"
            param = getattr(err, "param", None)
            raise TuneloopError(secrets.scrub(f"openai: fine-tuning job {job.id} failed: {code}: {message}"
                                              + (f" (param {param})" if param else "")))
        if job.status == "cancelled":
            raise TuneloopError(f"openai: fine-tuning job {job.id} was cancelled")
        if job.status == "paused":
            paused_since = paused_since or clock()
            if clock() - paused_since > cfg.max_paused_seconds:
                raise TuneloopError(f"openai: job {job.id} has been paused for over {cfg.max_paused_seconds:g}s "
                                    "(train.openai.max_paused_seconds); resume it on the service and rerun to reattach")
            log.warning(f"openai: job {job.id} is paused; waiting")
        else:
            paused_since = None
        interval = cfg.poll_seconds if fresh else min(interval * 1.5, cfg.poll_seconds * 8)
        sleep(interval)


def train_openai(exported: ExportedDataset, train: TrainConfig, state_home: Path, out_dir: Path,
                 flow_run_id: str | None = None, config_hash: str = "",
                 on_metrics: Callable[[int, dict[str, float]], None] | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> ApiModel:
    cfg = train.openai
    started = time.perf_counter()
    secret = api_key(cfg)
    client = make_client(cfg, secret)
    secrets = Secrets(secret)
    files = _Registry(state_home / "openai" / "files.json")
    jobs = _Registry(state_home / "openai" / "jobs.json")
    key = job_key(exported, cfg)
    metadata = {KEY: key, "dataset_version": exported.dataset_version, "config_hash": config_hash,
                "flow_run_id": flow_run_id or ""}
    existing = find_job(client, key, jobs, cfg, secrets, sleep)
    if existing is not None:
        job = existing
        stage_logger().info(f"openai: reattached to job {job.id} ({job.status}); nothing uploaded")
        jobs.put(key, job.id)
    else:
        train_id = upload(client, exported.train_path, exported.sha256["train.jsonl"], files, cfg, secrets, sleep)
        val_id = upload(client, exported.validation_path, exported.sha256["validation.jsonl"], files, cfg, secrets, sleep)
        job = create_job_once(client, exported, train_id, val_id, cfg, metadata, jobs, secrets, sleep)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "openai_job.json").write_text(orjson.dumps({"job_id": job.id, "key": key}).decode())
    history: list[tuple[int, float]] = []

    step_metrics: dict[str, list[tuple[int, float]]] = {}

    def metrics(step: int, values: dict[str, float]) -> None:
        if "train_loss" in values:
            history.append((step, values["train_loss"]))
        for name, value in values.items():
            step_metrics.setdefault(name, []).append((step, value))
        if on_metrics is not None:
            on_metrics(step, values)

    job = poll_job(client, job, cfg, secrets, metrics, sleep)
    result_path = None
    if job.result_files:
        content = call(lambda: client.files.content(job.result_files[0]), "files.content", cfg, secrets, sleep,
                       warn=_warn)
        result_path = out_dir / "step_metrics.csv"
        result_path.write_bytes(content.read())
    checkpoints = call(lambda: client.fine_tuning.jobs.checkpoints.list(job.id), "checkpoints.list", cfg, secrets,
                       sleep, warn=_warn)
    (out_dir / "checkpoints.json").write_bytes(orjson.dumps([c.model_dump() for c in checkpoints.data],
                                                            option=orjson.OPT_INDENT_2))
    return ApiModel(
        base_model=cfg.model, fine_tuned_model=job.fine_tuned_model, job_id=job.id,
        trained_tokens=job.trained_tokens, artifacts_dir=out_dir,
        dataset_version=exported.dataset_version, steps=history[-1][0] if history else 0,
        train_loss=history[-1][1] if history else None, loss_history=history,
        train_seconds=round(time.perf_counter() - started, 2), step_metrics=step_metrics,
    )


def cancel_jobs_of_flow_run(cfg: OpenAITrainConfig, flow_run_id: str) -> list[str]:
    """The flow's on-cancellation hook: cancel every unfinished job this flow run started."""
    secret = api_key(cfg)
    client = make_client(cfg, secret)
    secrets = Secrets(secret)
    page = call(lambda: client.fine_tuning.jobs.list(metadata={"flow_run_id": flow_run_id}, limit=20),
                 "jobs.list", cfg, secrets, warn=_warn)
    cancelled = []
    for job in page.data:
        if (job.metadata or {}).get("flow_run_id") == flow_run_id and job.status not in TERMINAL:
            call(lambda j=job.id: client.fine_tuning.jobs.cancel(j), f"jobs.cancel {job.id}", cfg, secrets,
                 warn=_warn)
            cancelled.append(job.id)
    return cancelled


@task(name="train", cache_policy=NO_CACHE)
def train_openai_task(exported: ExportedDataset, train: TrainConfig, ctx: RunContext,
                      init_adapter: Path | None = None) -> ApiModel:
    """The backends' one signature; an API job starts from its base model (``init_adapter`` is a local one's)."""
    trained = train_openai(exported, train, ctx.state.home, ctx.run_dir / "openai", ctx.run_id, ctx.config_hash)
    get_run_logger().info(f"train: {trained.fine_tuned_model} from job {trained.job_id}, "
                          f"{trained.trained_tokens} trained tokens, "
                          + (f"loss at the last step {trained.train_loss:.4f}" if trained.train_loss is not None
                             else "no loss reported"))
    return trained
