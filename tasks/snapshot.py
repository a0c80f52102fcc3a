"""Snapshot: the accepted examples as one immutable, content-addressed dataset version."""

from __future__ import annotations

import hashlib
from pathlib import Path

import orjson
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tasks.records import ChatExample, CheckedBatch, DatasetVersion


def dataset_version_of(examples: list[ChatExample]) -> str:
    """Order-independent: the same examples in any order are the same version."""
    digest = hashlib.sha256()
    for h in sorted(e.content_hash for e in examples):
        digest.update(bytes.fromhex(h))
    return digest.hexdigest()[:16]


def write_snapshot(checked: CheckedBatch, datasets_dir: Path) -> DatasetVersion:
    examples = sorted(checked.accepted, key=lambda e: e.content_hash)
    version = dataset_version_of(examples)
    path = datasets_dir / f"{version}.jsonl"
    if not path.exists():  # content-addressed: an existing file already holds exactly these examples
        datasets_dir.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_bytes(b"".join(orjson.dumps(e.model_dump(mode="json")) + b"\n" for e in examples))
        tmp.rename(path)
    return DatasetVersion(version=version, path=path, n_examples=len(examples))


def read_snapshot(dataset: DatasetVersion) -> list[ChatExample]:
    with dataset.path.open("rb") as fh:
        return [ChatExample.model_validate(orjson.loads(line)) for line in fh if line.strip()]


@task(name="snapshot", cache_policy=NO_CACHE)
def snapshot_task(checked: CheckedBatch, datasets_dir: Path) -> DatasetVersion:
    dataset = write_snapshot(checked, datasets_dir)
    get_run_logger().info(f"snapshot: dataset version {dataset.version} ({dataset.n_examples} examples)")
    return dataset
