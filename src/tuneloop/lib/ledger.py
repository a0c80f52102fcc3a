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

from tuneloop.core.records import DatasetVersion, RawBatch, TuneloopError
from tuneloop.lib.registry import ModelRegistry, Registered


class ConsumedFile(BaseModel):
    name: str
    size: int
    dataset_version: str
    at: str


class Ledger(BaseModel):
    files: dict[str, ConsumedFile] = Field(default_factory=dict)  # by sha256 of the content
    watermarks: dict[str, Any] = Field(default_factory=dict)  # by SQL source key
    # by SQL source key: digests (id + content) of the rows within the look-back of its watermark, so that a
    # row read again is skipped and a late or changed one is not; replaced each run, so it stays one window
    recent_rows: dict[str, list[str]] = Field(default_factory=dict)
    dataset_version: str | None = None  # the newest snapshot, the base of the next one
    trained_version: str | None = None  # the snapshot the last registered candidate was trained on
    # dataset version -> the settings hashes (PipelineConfig.settings_hash) candidates were trained on it with
    trained_settings: dict[str, list[str]] = Field(default_factory=dict)
    last_settings: dict[str, str] = Field(default_factory=dict)  # the last training's settings, to say what changed

    @property
    def untrained(self) -> bool:
        return self.dataset_version is not None and self.dataset_version != self.trained_version

    def trained_with(self, version: str, settings_hash: str) -> bool | None:
        """Whether ``version`` was trained on with these settings (None: unknown, a ledger from before they were kept)."""
        hashes = self.trained_settings.get(version)
        if hashes is None:
            return None if version == self.trained_version else False
        return settings_hash in hashes


def mark_trained(ledger: Ledger, version: str, settings_hash: str, settings: dict[str, str]) -> Ledger:
    """The ledger once a candidate trained on ``version`` with these settings is registered."""
    hashes = [h for h in ledger.trained_settings.get(version, []) if h != settings_hash][-19:] + [settings_hash]
    kept = dict(ledger.trained_settings)
    kept[version] = hashes
    return ledger.model_copy(update={"trained_version": version, "trained_settings": kept, "last_settings": settings})


def settings_changes(before: dict[str, str], now: dict[str, str], shown: int = 4) -> str:
    """``train.local.epochs 2.0 -> 3.0, ...``: what differs between two settings, for the run log."""
    keys = sorted(k for k in before.keys() | now.keys() if before.get(k) != now.get(k))
    parts = [f"{k} {before.get(k, '(unset)')} -> {now.get(k, '(unset)')}" for k in keys[:shown]]
    return ", ".join(parts) + (f" and {len(keys) - shown} more" if len(keys) > shown else "")


def load_ledger(path: Path) -> Ledger:
    if not path.exists():
        return Ledger()
    try:
        return Ledger.model_validate(orjson.loads(path.read_bytes()))
    except (orjson.JSONDecodeError, ValueError) as exc:
        raise TuneloopError(f"consumption ledger {path} is unreadable ({exc}); restore it or delete it to "
                            "re-read every landing file") from None


def consume(ledger: Ledger, raw: RawBatch, dataset: DatasetVersion, unread: list[str] | tuple = ()) -> Ledger:
    """The ledger after this run: its files and rows belong to ``dataset`` from now on, except ``unread``
    files (the gate could not read them to the end: they are read again once readable)."""
    now = datetime.now(UTC).isoformat(timespec="seconds")
    files = dict(ledger.files)
    skip = set(unread)
    for f in raw.files:
        if str(f.path) in skip:
            continue
        files[f.sha256] = ConsumedFile(name=Path(f.path).name, size=f.size, dataset_version=dataset.version, at=now)
    for entry in raw.rejected:  # an unreadable file is accounted for in quarantine; a fixed copy is new
        digest = entry.record.get("sha256") if isinstance(entry.record, dict) else None
        if digest:
            files[digest] = ConsumedFile(name=Path(entry.source).name, size=entry.record.get("size", 0),
                                         dataset_version=dataset.version, at=now)
    watermarks, recent_rows = dict(ledger.watermarks), dict(ledger.recent_rows)
    if raw.sql is not None and raw.sql.up_to is not None:
        watermarks[raw.sql.source_key] = raw.sql.up_to
    if raw.sql is not None and raw.sql.window is not None:
        recent_rows[raw.sql.source_key] = raw.sql.window
    # a copy, so that fields this function does not own are kept
    return ledger.model_copy(update={"files": files, "watermarks": watermarks, "recent_rows": recent_rows,
                                     "dataset_version": dataset.version})


def commit_ledger(ledger: Ledger, path: Path) -> None:
    from tuneloop.core.state import write_atomically

    write_atomically(path, orjson.dumps(ledger.model_dump(mode="json"), option=orjson.OPT_INDENT_2))


class TrainingPlan(BaseModel):
    """Whether this run trains, on which dataset version, and why: the one decision the ledger, the newest
    snapshot, the settings and the registry make together."""

    train: bool
    reason: str
    dataset: DatasetVersion | None = None
    mark_trained: bool = False  # the champion already has this data and settings: record it so the next run knows
    complete_version: str | None = None  # a model version a killed run registered: finish its registration


class Settings(BaseModel):
    """The settings that shape the model (PipelineConfig.model_settings) and their hash."""

    hash: str
    values: dict[str, str]


def plan_training(ledger: Ledger, new: DatasetVersion | None, datasets_dir: Path, champion: tuple[str | None, str | None],
                  settings: Settings, force: bool = False, registered: Registered | None = None) -> TrainingPlan:
    """``new`` is the snapshot this run wrote (None when nothing new was collected); ``champion`` is the dataset
    version and settings hash the champion was trained with; ``force`` (tuneloop run --retrain) trains anyway;
    ``registered`` is what the registry holds for the version to train on (None: not asked). The ledger alone
    cannot know that a model was deleted, the store replaced, or a run killed after it registered."""
    from tuneloop.lib.datasets import load_snapshot

    note = ""
    if new is None:
        version = ledger.dataset_version
        if version is None:
            return TrainingPlan(train=False, reason="nothing collected yet: no dataset version to train on")
        known = ledger.trained_with(version, settings.hash)
        if known is None and champion[0] == version and champion[1] is not None:
            known = champion[1] == settings.hash  # a ledger from before settings were kept: ask the champion
        if force:
            note = f"nothing new collected; retraining on dataset version {version} as asked (--retrain)"
        elif registered is not None and registered.version is not None:
            pass  # registered already, by a run that may have died after it: decided below
        elif ledger.untrained:
            note = f"nothing new collected; dataset version {version} was never trained on: training now"
        elif known is False:
            changed = settings_changes(ledger.last_settings, settings.values) if ledger.last_settings else ""
            note = (f"nothing new collected, but the training settings changed since dataset version {version} was "
                    f"trained on ({changed or 'settings not recorded then'}): training on it with the new settings")
        elif registered is not None:  # the ledger says trained, the registry has nothing for it
            note = (f"nothing new collected; the ledger says dataset version {version} was trained on with these "
                    "settings, but the registry has no model version for it (deleted, or a new tracking store): "
                    "training on it again")
        elif known is None:  # trained before settings were recorded: assume these, and record them from now on
            return TrainingPlan(train=False, mark_trained=True, dataset=load_snapshot(datasets_dir, version),
                                reason=f"nothing new since dataset version {version}; the settings it was trained "
                                "with were not recorded: taking them to be these, so the next change retrains "
                                "(`tuneloop run --retrain` trains now)")
        else:
            return TrainingPlan(train=False, reason=f"nothing new since dataset version {version}, and it was "
                                "trained on with these settings; `tuneloop run --retrain` trains on it again")
        new = load_snapshot(datasets_dir, version)
    if registered is not None and registered.version is not None and not force:
        if not registered.complete:
            return TrainingPlan(train=False, dataset=new, mark_trained=True, complete_version=registered.version,
                                reason=f"dataset version {new.version} with these settings was registered as model "
                                f"version {registered.version} by a run that stopped before it finished: completing "
                                "that registration instead of training again")
        if ledger.trained_with(new.version, settings.hash) is not True:
            return TrainingPlan(train=False, dataset=new, mark_trained=True,
                                reason=f"dataset version {new.version} with these settings is already registered as "
                                f"model version {registered.version}: nothing to retrain (`tuneloop run --retrain` "
                                "trains anyway)")
        return TrainingPlan(train=False, reason=f"nothing new since dataset version {new.version}, and it was "
                            "trained on with these settings; `tuneloop run --retrain` trains on it again")
    champion_version, champion_settings = champion
    same_settings = (champion_settings == settings.hash if champion_settings is not None
                     else ledger.trained_with(new.version, settings.hash) is not False)
    if champion_version == new.version and same_settings and not force:
        return TrainingPlan(train=False, dataset=new, mark_trained=True,
                            reason=f"dataset version {new.version} is what the champion was trained on, with these "
                            "settings: nothing to retrain (`tuneloop run --retrain` trains anyway)")
    return TrainingPlan(train=True, dataset=new, reason=note or f"training on dataset version {new.version}")


@task(name="plan-training", cache_policy=NO_CACHE)
def plan_training_task(ledger: Ledger, new: DatasetVersion | None, datasets_dir: Path, registry: ModelRegistry,
                       settings: Settings, force: bool = False) -> TrainingPlan:
    target = new.version if new is not None else ledger.dataset_version
    if target is None:
        return plan_training(ledger, new, datasets_dir, (None, None), settings, force)
    return plan_training(ledger, new, datasets_dir, registry.champion_training(), settings, force,
                         registry.view(target, settings.hash))
