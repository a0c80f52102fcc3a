"""The training decision: one typed step over the ledger, this run's snapshot, the settings and the champion."""

import hashlib
import json

from conftest import DEMO_CONFIG
from tuneloop.core.config import load_config
from tuneloop.core.records import DatasetVersion
from tuneloop.lib.datasets import version_of
from tuneloop.lib.ledger import Ledger, Settings, mark_trained, plan_training, settings_changes

S1 = Settings(hash="s1", values={"train.local.epochs": "2.0", "train.local.learning_rate": "0.003"})
S2 = Settings(hash="s2", values={"train.local.epochs": "3.0", "train.local.learning_rate": "0.003"})


def _hashes(name: int, n: int) -> list[str]:
    return [hashlib.sha256(f"{name}-{i}".encode()).hexdigest() for i in range(n)]


SIZES = {1: 3, 2: 5, 3: 3, 4: 3}
V1, V2, V3, V4 = (version_of(_hashes(k, n)) for k, n in SIZES.items())  # snapshots are named after their content


def snapshot(tmp_path, version: str, n: int = 3) -> DatasetVersion:
    """A snapshot file that hashes to its name (as every snapshot read must)."""
    k = (V1, V2, V3, V4).index(version) + 1
    path = tmp_path / f"{version}.jsonl"
    path.write_text("".join(json.dumps({"content_hash": h}) + "\n" for h in _hashes(k, SIZES[k])))
    return DatasetVersion(version=version, path=path, n_examples=SIZES[k])


def trained(version: str, settings: Settings = S1) -> Ledger:
    return mark_trained(Ledger(dataset_version=version), version, settings.hash, settings.values)


def test_nothing_new_and_already_trained_with_these_settings_does_nothing(tmp_path):
    plan = plan_training(trained(V1), None, tmp_path, (V1, "s1"), S1)
    assert not plan.train and not plan.mark_trained
    assert plan.reason.startswith(f"nothing new since dataset version {V1}") and "--retrain" in plan.reason
    first = plan_training(Ledger(), None, tmp_path, (None, None), S1)
    assert not first.train and "no dataset version" in first.reason


def test_an_untrained_version_is_trained_on_without_new_data(tmp_path):
    snapshot(tmp_path, V2, n=5)
    ledger = trained(V1).model_copy(update={"dataset_version": V2})
    plan = plan_training(ledger, None, tmp_path, (V1, "s1"), S1)
    assert plan.train and plan.dataset.version == V2 and plan.dataset.n_examples == 5
    assert "never trained on" in plan.reason


def test_the_champions_own_data_and_settings_are_not_trained_again_and_are_marked(tmp_path):
    new = snapshot(tmp_path, V3)
    plan = plan_training(Ledger(dataset_version=V3), new, tmp_path, (V3, "s1"), S1)
    assert not plan.train and plan.mark_trained and plan.dataset.version == V3
    assert plan_training(Ledger(dataset_version=V3), new, tmp_path, (V2, "s1"), S1).train
    # the champion has this data but was trained with other settings: train with these
    assert plan_training(Ledger(dataset_version=V3), new, tmp_path, (V3, "s2"), S1).train


def test_changed_settings_retrain_the_same_data_and_say_what_changed(tmp_path):
    snapshot(tmp_path, V1)
    plan = plan_training(trained(V1, S1), None, tmp_path, (V1, "s1"), S2)
    assert plan.train and plan.dataset.version == V1
    assert "train.local.epochs 2.0 -> 3.0" in plan.reason and "learning_rate" not in plan.reason
    # once trained with S2 as well, neither S1 nor S2 trains again; a third setting does
    both = mark_trained(trained(V1, S1), V1, S2.hash, S2.values)
    assert not plan_training(both, None, tmp_path, (V1, "s1"), S1).train
    assert not plan_training(both, None, tmp_path, (V1, "s1"), S2).train
    assert plan_training(both, None, tmp_path, (V1, "s1"), Settings(hash="s3", values={})).train


def test_retrain_forces_a_run_on_the_newest_data(tmp_path):
    snapshot(tmp_path, V1)
    plan = plan_training(trained(V1), None, tmp_path, (V1, "s1"), S1, force=True)
    assert plan.train and plan.dataset.version == V1 and "--retrain" in plan.reason
    new = snapshot(tmp_path, V4)
    assert plan_training(Ledger(dataset_version=V4), new, tmp_path, (V4, "s1"), S1, force=True).train


def test_a_ledger_from_before_settings_were_kept_records_them_and_then_notices_a_change(tmp_path):
    snapshot(tmp_path, V1)
    old = Ledger(dataset_version=V1, trained_version=V1)
    assert old.trained_with(V1, "s1") is None
    plan = plan_training(old, None, tmp_path, (V1, None), S1)
    assert not plan.train and plan.mark_trained and "not recorded" in plan.reason
    recorded = mark_trained(old, V1, S1.hash, S1.values)  # what the flow commits for mark_trained
    assert plan_training(recorded, None, tmp_path, (V1, None), S2).train
    # a champion tagged with its settings answers for the old ledger
    assert plan_training(old, None, tmp_path, (V1, "s1"), S2).train
    assert not plan_training(old, None, tmp_path, (V1, "s1"), S1).train


def test_an_untagged_champion_does_not_hide_a_settings_change_the_ledger_knows(tmp_path):
    new = snapshot(tmp_path, V1)
    plan = plan_training(trained(V1, S1), new, tmp_path, (V1, None), S2)
    assert plan.train and not plan.mark_trained


def test_model_settings_cover_what_shapes_the_model_and_not_where_it_runs():
    base = load_config(DEMO_CONFIG)
    same = [["train.local.placement=pool"], ["train.local.progress_every=3"], ["evaluate.cache_generations=false"],
            ["schedule.retrain_cron=null"], ["drift.window=50"], ["train.openai.model=gpt-4.1-2025-04-14"]]
    for overrides in same:
        assert load_config(DEMO_CONFIG, overrides).settings_hash() == base.settings_hash(), overrides
    changed = [["train.local.epochs=5"], ["train.local.lora.r=8"], ["export.seed=3"], ["export.too_long=quarantine"],
               ["evaluate.label_pattern=^(\\S+)"], ["train.base_model=/models/other"]]
    for overrides in changed:
        other = load_config(DEMO_CONFIG, overrides)
        assert other.settings_hash() != base.settings_hash(), overrides
        assert settings_changes(base.model_settings(), other.model_settings()).startswith(overrides[0].split("=")[0])


def test_marked_settings_stay_bounded():
    ledger = Ledger(dataset_version=V1)
    for i in range(50):
        ledger = mark_trained(ledger, V1, f"s{i}", {})
    assert len(ledger.trained_settings[V1]) == 20 and ledger.trained_settings[V1][-1] == "s49"


def test_the_settings_hash_follows_file_contents_not_paths(tmp_path):
    import shutil

    from conftest import ROOT

    copy = tmp_path / "elsewhere"
    for part in ("deployments", "data/demo", "expectations"):
        shutil.copytree(ROOT / part, copy / part)
    here, there = load_config(DEMO_CONFIG), load_config(copy / "deployments" / "demo.yaml")
    assert here.settings_hash() == there.settings_hash()  # another checkout, another machine: the same training
    held = copy / "data" / "demo" / "holdout.jsonl"
    held.write_text("".join(held.read_text().splitlines(True)[:-1]))  # an edited held-out set changes the training set
    edited = load_config(copy / "deployments" / "demo.yaml")
    assert edited.settings_hash() != here.settings_hash()
    assert settings_changes(here.model_settings(), edited.model_settings()).startswith("evaluate.holdout sha256:")
