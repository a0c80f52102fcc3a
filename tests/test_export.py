import hashlib
import json

import pytest

from conftest import DEMO, DEMO_CONFIG
from flows.config import ExportConfig, load_config
from tasks.collect import collect_landing
from tasks.export import export_chat_jsonl
from tasks.heldout import read_heldout
from tasks.quality import check_batch
from tasks.snapshot import dataset_version_of, read_snapshot, write_snapshot


@pytest.fixture(scope="module")
def checked(tmp_path_factory):
    cfg = load_config(DEMO_CONFIG)
    landing = tmp_path_factory.mktemp("landing")
    (landing / "tickets.jsonl").write_bytes((DEMO / "tickets.jsonl").read_bytes())
    return check_batch(collect_landing(cfg.source, landing), cfg.mapping, cfg.quality,
                       tmp_path_factory.mktemp("run"))


def test_dataset_version_is_the_content_not_the_order(checked, tmp_path):
    examples = checked.accepted
    assert dataset_version_of(examples) == dataset_version_of(list(reversed(examples)))
    assert dataset_version_of(examples) != dataset_version_of(examples[1:])
    dataset = write_snapshot(checked, tmp_path)
    assert dataset.path.name == f"{dataset.version}.jsonl"
    assert {e.content_hash for e in read_snapshot(dataset)} == {e.content_hash for e in examples}


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
