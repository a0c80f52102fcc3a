"""Dataset versions on disk: content-addressed snapshots, checked against their name whenever they are read.

A snapshot is named after the hash of its examples' content hashes (order-independent), so a truncated or
damaged file is an error naming it, never a smaller dataset a model is then trained on. The snapshot stage
writes versions; the export, the ledger, the drift monitor and the CLI read them through here.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import orjson

from tuneloop.core.records import ChatExample, DatasetVersion, TuneloopError


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
