"""The training decision: one typed step over the ledger, this run's snapshot, the settings and the champion."""

from conftest import DEMO_CONFIG
from tuneloop.core.config import load_config
from tuneloop.core.records import DatasetVersion
from tuneloop.tasks.ledger import Ledger, Settings, mark_trained, plan_training, settings_changes

S1 = Settings(hash="s1", values={"train.local.epochs": "2.0", "train.local.learning_rate": "0.003"})
S2 = Settings(hash="s2", values={"train.local.epochs": "3.0", "train.local.learning_rate": "0.003"})


def snapshot(tmp_path, version: str, n: int = 3) -> DatasetVersion:
    path = tmp_path / f"{version}.jsonl"
    path.write_text("".join("{}\n" for _ in range(n)))
    return DatasetVersion(version=version, path=path, n_examples=n)


def trained(version: str, settings: Settings = S1) -> Ledger:
    return mark_trained(Ledger(dataset_version=version), version, settings.hash, settings.values)


def test_nothing_new_and_already_trained_with_these_settings_does_nothing(tmp_path):
    plan = plan_training(trained("v1"), None, tmp_path, ("v1", "s1"), S1)
    assert not plan.train and not plan.mark_trained
    assert plan.reason.startswith("nothing new since dataset version v1") and "--retrain" in plan.reason
    first = plan_training(Ledger(), None, tmp_path, (None, None), S1)
    assert not first.train and "no dataset version" in first.reason


def test_an_untrained_version_is_trained_on_without_new_data(tmp_path):
    snapshot(tmp_path, "v2", n=5)
    ledger = trained("v1").model_copy(update={"dataset_version": "v2"})
    plan = plan_training(ledger, None, tmp_path, ("v1", "s1"), S1)
    assert plan.train and plan.dataset.version == "v2" and plan.dataset.n_examples == 5
    assert "never trained on" in plan.reason


def test_the_champions_own_data_and_settings_are_not_trained_again_and_are_marked(tmp_path):
    new = snapshot(tmp_path, "v3")
    plan = plan_training(Ledger(dataset_version="v3"), new, tmp_path, ("v3", "s1"), S1)
    assert not plan.train and plan.mark_trained and plan.dataset.version == "v3"
    assert plan_training(Ledger(dataset_version="v3"), new, tmp_path, ("v2", "s1"), S1).train
    # the champion has this data but was trained with other settings: train with these
    assert plan_training(Ledger(dataset_version="v3"), new, tmp_path, ("v3", "s2"), S1).train


def test_changed_settings_retrain_the_same_data_and_say_what_changed(tmp_path):
    snapshot(tmp_path, "v1")
    plan = plan_training(trained("v1", S1), None, tmp_path, ("v1", "s1"), S2)
    assert plan.train and plan.dataset.version == "v1"
    assert "train.local.epochs 2.0 -> 3.0" in plan.reason and "learning_rate" not in plan.reason
    # once trained with S2 as well, neither S1 nor S2 trains again; a third setting does
    both = mark_trained(trained("v1", S1), "v1", S2.hash, S2.values)
    assert not plan_training(both, None, tmp_path, ("v1", "s1"), S1).train
    assert not plan_training(both, None, tmp_path, ("v1", "s1"), S2).train
    assert plan_training(both, None, tmp_path, ("v1", "s1"), Settings(hash="s3", values={})).train


def test_retrain_forces_a_run_on_the_newest_data(tmp_path):
    snapshot(tmp_path, "v1")
    plan = plan_training(trained("v1"), None, tmp_path, ("v1", "s1"), S1, force=True)
    assert plan.train and plan.dataset.version == "v1" and "--retrain" in plan.reason
    new = snapshot(tmp_path, "v4")
    assert plan_training(Ledger(dataset_version="v4"), new, tmp_path, ("v4", "s1"), S1, force=True).train


def test_a_ledger_from_before_settings_were_kept_records_them_and_then_notices_a_change(tmp_path):
    snapshot(tmp_path, "v1")
    old = Ledger(dataset_version="v1", trained_version="v1")
    assert old.trained_with("v1", "s1") is None
    plan = plan_training(old, None, tmp_path, ("v1", None), S1)
    assert not plan.train and plan.mark_trained and "not recorded" in plan.reason
    recorded = mark_trained(old, "v1", S1.hash, S1.values)  # what the flow commits for mark_trained
    assert plan_training(recorded, None, tmp_path, ("v1", None), S2).train
    # a champion tagged with its settings answers for the old ledger
    assert plan_training(old, None, tmp_path, ("v1", "s1"), S2).train
    assert not plan_training(old, None, tmp_path, ("v1", "s1"), S1).train


def test_an_untagged_champion_does_not_hide_a_settings_change_the_ledger_knows(tmp_path):
    new = snapshot(tmp_path, "v1")
    plan = plan_training(trained("v1", S1), new, tmp_path, ("v1", None), S2)
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
    ledger = Ledger(dataset_version="v1")
    for i in range(50):
        ledger = mark_trained(ledger, "v1", f"s{i}", {})
    assert len(ledger.trained_settings["v1"]) == 20 and ledger.trained_settings["v1"][-1] == "s49"


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
