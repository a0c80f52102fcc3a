"""The consumption ledger: which landing files and SQL rows are already in a dataset version.

It is committed only after the run's snapshot is written (write to a temporary file, then rename), so
a run that crashes or fails its gate consumes nothing and the next run reads the same data again.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import orjson
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, Field

from tuneloop.core.config import RegisterConfig
from tuneloop.core.records import DatasetVersion, RawBatch, TuneloopError


class ConsumedFile(BaseModel):
    name: str
    size: int
    dataset_version: str
    at: str


class Ledger(BaseModel):
    files: dict[str, ConsumedFile] = Field(default_factory=dict)  # by sha256 of the content
    watermarks: dict[str, Any] = Field(default_factory=dict)  # by SQL source key
    dataset_version: str | None = None  # the newest snapshot, the base of the next one
    trained_version: str | None = None  # the snapshot the last registered candidate was trained on

    @property
    def untrained(self) -> bool:
        return self.dataset_version is not None and self.dataset_version != self.trained_version


def load_ledger(path: Path) -> Ledger:
    if not path.exists():
        return Ledger()
    try:
        return Ledger.model_validate(orjson.loads(path.read_bytes()))
    except (orjson.JSONDecodeError, ValueError) as exc:
        raise TuneloopError(f"consumption ledger {path} is unreadable ({exc}); restore it or delete it to "
                            "re-read every landing file") from None


def consume(ledger: Ledger, raw: RawBatch, dataset: DatasetVersion) -> Ledger:
    """The ledger after this run: its files and rows belong to ``dataset`` from now on."""
    now = datetime.now(UTC).isoformat(timespec="seconds")
    files = dict(ledger.files)
    for f in raw.files:
        files[f.sha256] = ConsumedFile(name=Path(f.path).name, size=f.size, dataset_version=dataset.version, at=now)
    for entry in raw.rejected:  # an unreadable file is accounted for in quarantine; a fixed copy is new
        digest = entry.record.get("sha256") if isinstance(entry.record, dict) else None
        if digest:
            files[digest] = ConsumedFile(name=Path(entry.source).name, size=entry.record.get("size", 0),
                                         dataset_version=dataset.version, at=now)
    watermarks = dict(ledger.watermarks)
    if raw.sql is not None and raw.sql.up_to is not None:
        watermarks[raw.sql.source_key] = raw.sql.up_to
    return Ledger(files=files, watermarks=watermarks, dataset_version=dataset.version,
                  trained_version=ledger.trained_version)


def commit_ledger(ledger: Ledger, path: Path) -> None:
    from tuneloop.core.state import write_atomically

    write_atomically(path, orjson.dumps(ledger.model_dump(mode="json"), option=orjson.OPT_INDENT_2))


class TrainingPlan(BaseModel):
    """Whether this run trains, on which dataset version, and why: the one decision the ledger, the newest
    snapshot and the registry make together."""

    train: bool
    reason: str
    dataset: DatasetVersion | None = None
    mark_trained: bool = False  # the champion already has this data: record it so the next run knows


def plan_training(ledger: Ledger, new: DatasetVersion | None, datasets_dir: Path,
                  champion_dataset: str | None) -> TrainingPlan:
    """``new`` is the snapshot this run wrote (None when nothing new was collected)."""
    from tuneloop.tasks.snapshot import load_snapshot

    note = ""
    if new is None:
        if not ledger.untrained:
            return TrainingPlan(train=False, reason="nothing new since dataset version "
                                f"{ledger.dataset_version or '(none yet)'}")
        new = load_snapshot(datasets_dir, ledger.dataset_version)
        note = f"nothing new collected; dataset version {new.version} was never trained on: training now"
    if champion_dataset == new.version:
        return TrainingPlan(train=False, dataset=new, mark_trained=True,
                            reason=f"dataset version {new.version} is what the champion was trained on: nothing to retrain")
    return TrainingPlan(train=True, dataset=new, reason=note or f"training on dataset version {new.version}")


@task(name="plan-training", cache_policy=NO_CACHE)
def plan_training_task(ledger: Ledger, new: DatasetVersion | None, datasets_dir: Path, registry: RegisterConfig,
                       tracking_uri: str) -> TrainingPlan:
    from tuneloop.tasks.register import champion_dataset_version

    # the registry is asked only when there is something to train (a no-op run touches nothing)
    wanted = new is not None or ledger.untrained
    return plan_training(ledger, new, datasets_dir,
                         champion_dataset_version(registry, tracking_uri) if wanted else None)
