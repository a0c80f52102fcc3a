"""Snapshot: previous dataset version + this run's accepted examples = the next dataset version.

Deduplicated by normalized content hash; a record whose id is already in the snapshot with other
content replaces it (the source updated it). Versions are content-addressed and immutable: the same
examples, in any order, are the same version, written once. Being named after their content, they are
checked against their name whenever they are read (``tuneloop.lib.datasets``): a truncated or damaged snapshot is an error naming
the file, never a smaller dataset that a model is then trained on.
"""

from __future__ import annotations

from pathlib import Path

import orjson
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tuneloop.core.records import CheckedBatch, DatasetVersion
from tuneloop.core.state import unique_temporary
from tuneloop.lib.datasets import _intact, _lines, verified_hashes, version_of

MERGES_NAMED = 20  # merged record ids named in the summary; the count is always whole


def write_snapshot(checked: CheckedBatch, datasets_dir: Path, previous: str | None = None) -> DatasetVersion:
    prev_path = datasets_dir / f"{previous}.jsonl" if previous else None
    if prev_path is not None:  # the base of the new version: a damaged one would silently shrink it
        verified_hashes(prev_path, previous)
    new_by_hash: dict[str, bytes] = {}
    new_ids: dict[str, str] = {}
    kept_id: dict[str, str] = {}
    merged: list[tuple[str, str]] = []
    n_merged = 0
    for line in _lines(checked.accepted_path):
        row = orjson.loads(line)
        h = row["content_hash"]
        if h in new_by_hash:  # the same example as one already accepted in this batch: counted and named
            n_merged += 1
            if len(merged) < MERGES_NAMED:
                merged.append((str(row["record_id"]), kept_id[h]))
        else:
            new_by_hash[h], kept_id[h] = line, str(row["record_id"])
        new_ids[row["record_id"]] = h

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
                          n_added=len(new_by_hash), n_already_present=n_present, n_replaced=n_replaced,
                          n_merged=n_merged, merged=merged)


@task(name="snapshot", cache_policy=NO_CACHE)
def snapshot_task(checked: CheckedBatch, datasets_dir: Path, previous: str | None) -> DatasetVersion:
    d = write_snapshot(checked, datasets_dir, previous)
    get_run_logger().info(snapshot_summary(d, checked.n_accepted))
    return d


def snapshot_summary(d: DatasetVersion, n_accepted: int) -> str:
    """Every accepted record accounted for: new, already in the dataset, or merged with its twin (named)."""
    named = ", ".join(f"{merged} = {kept}" for merged, kept in d.merged)
    more = f", and {d.n_merged - len(d.merged)} more" if d.n_merged > len(d.merged) else ""
    merged = (f"; merged {d.n_merged} with an accepted record of the same mapped content ({named}{more})"
              if d.n_merged else "")
    return (f"snapshot: dataset version {d.version} = {d.previous or 'nothing'} + {d.n_added} new"
            f" ({d.n_already_present} already present, {d.n_replaced} replaced by a newer version): {d.n_examples}"
            f" examples. Accepted {n_accepted} = {d.n_added} new + {n_accepted - d.n_added - d.n_merged} already"
            f" present + {d.n_merged} merged{merged}")
