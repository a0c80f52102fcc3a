"""Snapshot: previous dataset version + this run's accepted examples = the next dataset version.

Deduplicated by normalized content hash; a record whose id is already in the snapshot with other
content replaces it (the source updated it). Versions are content-addressed and immutable: the same
examples, in any order, are the same version, written once.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import orjson
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tuneloop.core.records import ChatExample, CheckedBatch, DatasetVersion, TuneloopError


def _lines(path: Path):
    with path.open("rb") as fh:
        for line in fh:
            if line.strip():
                yield line


def version_of(hashes) -> str:
    """Order-independent: sort the content hashes, hash them."""
    digest = hashlib.sha256()
    for h in sorted(hashes):
        digest.update(bytes.fromhex(h))
    return digest.hexdigest()[:16]


def write_snapshot(checked: CheckedBatch, datasets_dir: Path, previous: str | None = None) -> DatasetVersion:
    prev_path = datasets_dir / f"{previous}.jsonl" if previous else None
    new_by_hash: dict[str, bytes] = {}
    new_ids: dict[str, str] = {}
    for line in _lines(checked.accepted_path):
        row = orjson.loads(line)
        new_by_hash.setdefault(row["content_hash"], line)
        new_ids[row["record_id"]] = row["content_hash"]

    kept_prev: list[str] = []
    n_present = n_replaced = 0
    if prev_path is not None and prev_path.exists():
        for line in _lines(prev_path):
            row = orjson.loads(line)
            h = row["content_hash"]
            if h in new_by_hash:  # already in the dataset: keep the old line, drop the new copy
                n_present += 1
                del new_by_hash[h]
            elif new_ids.get(row["record_id"], h) != h:
                n_replaced += 1
                continue
            kept_prev.append(h)
    hashes = kept_prev + list(new_by_hash)
    version = version_of(hashes)
    path = datasets_dir / f"{version}.jsonl"
    if not path.exists():
        datasets_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".jsonl.tmp")
        keep = set(kept_prev)
        with tmp.open("wb") as out:
            if prev_path is not None and prev_path.exists():
                for line in _lines(prev_path):
                    if orjson.loads(line)["content_hash"] in keep:
                        out.write(line)
            out.writelines(new_by_hash.values())
        tmp.replace(path)
    return DatasetVersion(version=version, path=path, n_examples=len(hashes), previous=previous,
                          n_added=len(new_by_hash), n_already_present=n_present, n_replaced=n_replaced)


def load_snapshot(datasets_dir: Path, version: str) -> DatasetVersion:
    """An existing dataset version, e.g. to train on again after a run that failed after its snapshot."""
    path = datasets_dir / f"{version}.jsonl"
    if not path.exists():
        raise TuneloopError(f"dataset version {version} is in the ledger but {path} is missing")
    return DatasetVersion(version=version, path=path, n_examples=sum(1 for _ in _lines(path)))


def read_examples(path: Path) -> list[ChatExample]:
    """Parsed and validated in one step by pydantic's JSON parser (faster than orjson + validate here)."""
    return [ChatExample.model_validate_json(line) for line in _lines(path)]


def read_snapshot(dataset: DatasetVersion) -> list[ChatExample]:
    return read_examples(dataset.path)


@task(name="snapshot", cache_policy=NO_CACHE)
def snapshot_task(checked: CheckedBatch, datasets_dir: Path, previous: str | None) -> DatasetVersion:
    d = write_snapshot(checked, datasets_dir, previous)
    get_run_logger().info(
        f"snapshot: dataset version {d.version} = {previous or 'nothing'} + {d.n_added} new"
        f" ({d.n_already_present} already present, {d.n_replaced} replaced by a newer version): {d.n_examples} examples")
    return d
