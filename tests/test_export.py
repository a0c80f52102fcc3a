import hashlib
import json

import pytest

from conftest import DEMO, DEMO_CONFIG, accepted, gate_folder
from flows.config import ExportConfig, load_config
from tasks.export import export_chat_jsonl
from tasks.heldout import read_heldout
from tasks.snapshot import read_snapshot, version_of, write_snapshot


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    cfg = load_config(DEMO_CONFIG)
    landing = tmp_path_factory.mktemp("landing")
    (landing / "tickets.jsonl").write_bytes((DEMO / "tickets.jsonl").read_bytes())
    return gate_folder(landing, cfg, tmp_path_factory.mktemp("run"))


def test_dataset_version_is_the_content_not_the_order(checked, tmp_path):
    hashes = [e.content_hash for e in accepted(checked).values()]
    assert version_of(hashes) == version_of(list(reversed(hashes)))
    assert version_of(hashes) != version_of(hashes[1:])
    dataset = write_snapshot(checked, tmp_path)
    assert dataset.version == version_of(hashes) and dataset.n_examples == len(hashes)
    assert dataset.path.name == f"{dataset.version}.jsonl"
    assert {e.content_hash for e in read_snapshot(dataset)} == set(hashes)


def test_export_writes_chat_jsonl_splits_manifest_and_removes_heldout_overlaps(checked, tmp_path):
    cfg = load_config(DEMO_CONFIG)
    dataset = write_snapshot(checked, tmp_path / "datasets")
    heldout = read_heldout(cfg.evaluate.holdout, cfg.mapping)
    exported = export_chat_jsonl(dataset, cfg.export, heldout, tmp_path / "exports")
    train = [json.loads(line) for line in exported.train_path.read_text().splitlines()]
    val = [json.loads(line) for line in exported.validation_path.read_text().splitlines()]
    assert all(list(row) == ["messages"] for row in train + val)
    assert [m["role"] for m in train[0]["messages"]] == ["system", "user", "assistant"]
    manifest = json.loads(exported.manifest_path.read_text())
    removed = manifest["counts"]["heldout_overlaps_removed"]
    assert removed > 0  # the demo's templates do repeat across the two files
    assert len(train) + len(val) + removed == dataset.n_examples
    assert abs(len(val) - 0.1 * (len(train) + len(val))) <= 1
    held_users = {" ".join(h.prompt[-1]["content"].split()).casefold() for h in heldout}
    assert not any(" ".join(r["messages"][1]["content"].split()).casefold() in held_users for r in train + val)
    assert not {json.dumps(r) for r in train} & {json.dumps(r) for r in val}
    for name, path in (("train.jsonl", exported.train_path), ("validation.jsonl", exported.validation_path)):
        assert manifest["sha256"][name] == hashlib.sha256(path.read_bytes()).hexdigest() == exported.sha256[name]
    assert manifest["dataset_version"] == dataset.version
    assert sum(manifest["labels"]["train"].values()) == len(train)


def test_split_is_deterministic_and_follows_the_seed(checked, tmp_path):
    cfg = load_config(DEMO_CONFIG)
    dataset = write_snapshot(checked, tmp_path / "datasets")
    one = export_chat_jsonl(dataset, cfg.export, [], tmp_path / "a")
    two = export_chat_jsonl(dataset, cfg.export, [], tmp_path / "b")
    other = export_chat_jsonl(dataset, ExportConfig(seed=1), [], tmp_path / "c")
    assert one.sha256 == two.sha256
    assert one.sha256 != other.sha256
