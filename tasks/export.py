"""Export: the dataset version as OpenAI chat-format JSONL (train + validation) with a manifest.

The held-out evaluation examples are removed from both splits first, so a score is never inflated by
an example the model was trained on; how many were removed is in the manifest.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from pathlib import Path

import orjson
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.config import ExportConfig
from tasks.heldout import HeldOutExample, prompt_keys
from tasks.records import ChatExample, DatasetVersion, ExportedDataset, TuneloopError
from tasks.snapshot import read_snapshot


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def split_examples(examples: list[ChatExample], fraction: float, seed: str) -> tuple[list, list]:
    """Deterministic for a given dataset version and seed, whatever order the examples came in."""
    ordered = sorted(examples, key=lambda e: e.content_hash)
    random.Random(seed).shuffle(ordered)
    n_val = max(1, round(len(ordered) * fraction))
    return ordered[n_val:], ordered[:n_val]


def write_jsonl(path: Path, examples: list[ChatExample]) -> None:
    path.write_bytes(b"".join(orjson.dumps({"messages": e.messages}) + b"\n" for e in examples))


def export_chat_jsonl(
    dataset: DatasetVersion, export: ExportConfig, heldout: list[HeldOutExample], exports_dir: Path
) -> ExportedDataset:
    examples = read_snapshot(dataset)
    held = set(prompt_keys([h.prompt for h in heldout]))
    clean = [e for e, key in zip(examples, prompt_keys([e.messages for e in examples]), strict=True) if key not in held]
    overlaps = len(examples) - len(clean)
    if len(clean) < 2:
        raise TuneloopError(f"export: only {len(clean)} examples left after removing held-out overlaps")
    train, validation = split_examples(clean, export.validation_fraction, f"{export.seed}:{dataset.version}")

    export_key = hashlib.sha256(export.model_dump_json().encode()).hexdigest()[:8]
    directory = exports_dir / f"{dataset.version}-{export_key}"
    directory.mkdir(parents=True, exist_ok=True)
    train_path, validation_path = directory / "train.jsonl", directory / "validation.jsonl"
    write_jsonl(train_path, train)
    write_jsonl(validation_path, validation)
    sha = {"train.jsonl": sha256_file(train_path), "validation.jsonl": sha256_file(validation_path)}
    manifest = {
        "dataset_version": dataset.version,
        "snapshot": str(dataset.path),
        "split_seed": export.seed,
        "validation_fraction": export.validation_fraction,
        "counts": {"train": len(train), "validation": len(validation), "heldout_overlaps_removed": overlaps},
        "labels": {"train": dict(Counter(e.label for e in train if e.label is not None))},
        "sha256": sha,
    }
    manifest_path = directory / "manifest.json"
    manifest_path.write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    return ExportedDataset(
        dataset_version=dataset.version, directory=directory, train_path=train_path,
        validation_path=validation_path, manifest_path=manifest_path, n_train=len(train),
        n_validation=len(validation), sha256=sha,
    )


@task(name="export", cache_policy=NO_CACHE)
def export_task(dataset: DatasetVersion, export: ExportConfig, heldout: list[HeldOutExample],
                exports_dir: Path) -> ExportedDataset:
    exported = export_chat_jsonl(dataset, export, heldout, exports_dir)
    get_run_logger().info(f"export: {exported.n_train} train + {exported.n_validation} validation examples in {exported.directory}")
    return exported
