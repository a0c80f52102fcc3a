"""Snapshot: previous dataset version + this run's accepted examples = the next dataset version.

Deduplicated by normalized content hash; a record whose id is already in the snapshot with other
content replaces it (the source updated it). Versions are content-addressed and immutable: the same
examples, in any order, are the same version, written once. Being named after their content, they are
checked against their name whenever they are read: a truncated or damaged snapshot is an error naming
the file, never a smaller dataset that a model is then trained on.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import orjson
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tuneloop.core.records import ChatExample, CheckedBatch, DatasetVersion, TuneloopError
from tuneloop.core.state import unique_temporary


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


class SnapshotDamaged(TuneloopError):
    """A dataset version whose file is missing or does not hash to its name."""


def _damaged(path: Path, problem: str) -> SnapshotDamaged:
    return SnapshotDamaged(
        f"dataset snapshot {path} {problem}: it is named after the hash of its examples, so it is damaged (a "
        "disk or copy problem, or an edit). Restore it from a backup; or move consumed.json aside to rebuild "
        "the dataset from the landing files still there (files already moved away are then missing from it)")


def verified_hashes(path: Path, version: str) -> list[str]:
    """The content hashes of a snapshot's examples, after checking that they hash to ``version``."""
    if not path.is_file():
        raise _damaged(path, "is missing")
    hashes = []
    for n, line in enumerate(_lines(path), start=1):
        try:
            hashes.append(orjson.loads(line)["content_hash"])
        except (orjson.JSONDecodeError, KeyError, TypeError):
            raise _damaged(path, f"has an unreadable line {n}") from None
    try:
        actual = version_of(hashes)
    except ValueError:  # a content hash that is not hex
        actual = None
    if actual != version:
        raise _damaged(path, f"holds {len(hashes)} examples that do not hash to its version {version}")
    return hashes


def _intact(path: Path, version: str) -> bool:
    try:
        verified_hashes(path, version)
    except SnapshotDamaged:
        return False
    return True


def write_snapshot(checked: CheckedBatch, datasets_dir: Path, previous: str | None = None) -> DatasetVersion:
    prev_path = datasets_dir / f"{previous}.jsonl" if previous else None
    if prev_path is not None:  # the base of the new version: a damaged one would silently shrink it
        verified_hashes(prev_path, previous)
    new_by_hash: dict[str, bytes] = {}
    new_ids: dict[str, str] = {}
    for line in _lines(checked.accepted_path):
        row = orjson.loads(line)
        new_by_hash.setdefault(row["content_hash"], line)
        new_ids[row["record_id"]] = row["content_hash"]

    kept_prev: list[str] = []
    n_present = n_replaced = 0
    if prev_path is not None:
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
    if not _intact(path, version):  # written once; a damaged earlier copy is written again
        datasets_dir.mkdir(parents=True, exist_ok=True)
        keep = set(kept_prev)
        with unique_temporary(path) as (out, tmp):
            if prev_path is not None:
                for line in _lines(prev_path):
                    if orjson.loads(line)["content_hash"] in keep:
                        out.write(line)
            out.writelines(new_by_hash.values())
        try:
            verified_hashes(tmp, version)  # what was written is what was meant, before it takes the name
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
    return DatasetVersion(version=version, path=path, n_examples=len(hashes), previous=previous,
                          n_added=len(new_by_hash), n_already_present=n_present, n_replaced=n_replaced)


def load_snapshot(datasets_dir: Path, version: str) -> DatasetVersion:
    """An existing dataset version, e.g. to train on again after a run that failed after its snapshot."""
    path = datasets_dir / f"{version}.jsonl"
    return DatasetVersion(version=version, path=path, n_examples=len(verified_hashes(path, version)))


def read_examples(path: Path) -> list[ChatExample]:
    return [e for chunk in read_examples_in_chunks(path) for e in chunk]


def read_examples_in_chunks(path: Path, size: int = 10_000):
    """The examples, ``size`` at a time (for a consumer that works on one chunk while the next is parsed),
    parsed and validated in one step by pydantic's JSON parser (faster than orjson + validate here; its
    validator called directly: the model's wrapper costs a tenth of the parse)."""
    validate = ChatExample.__pydantic_validator__.validate_json
    lines = [line for line in path.read_bytes().splitlines() if line.strip()]
    for start in range(0, len(lines), size):
        yield [validate(line) for line in lines[start:start + size]]


def read_snapshot(dataset: DatasetVersion) -> list[ChatExample]:
    return read_examples(dataset.path)


@task(name="snapshot", cache_policy=NO_CACHE)
def snapshot_task(checked: CheckedBatch, datasets_dir: Path, previous: str | None) -> DatasetVersion:
    d = write_snapshot(checked, datasets_dir, previous)
    get_run_logger().info(
        f"snapshot: dataset version {d.version} = {previous or 'nothing'} + {d.n_added} new"
        f" ({d.n_already_present} already present, {d.n_replaced} replaced by a newer version): {d.n_examples} examples")
    return d
