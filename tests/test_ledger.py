"""The training decision: one typed step over the ledger, this run's snapshot and the champion's data."""

from tuneloop.core.records import DatasetVersion
from tuneloop.tasks.ledger import Ledger, plan_training


def snapshot(tmp_path, version: str, n: int = 3) -> DatasetVersion:
    path = tmp_path / f"{version}.jsonl"
    path.write_text("".join("{}\n" for _ in range(n)))
    return DatasetVersion(version=version, path=path, n_examples=n)


def test_nothing_new_and_already_trained_does_nothing(tmp_path):
    plan = plan_training(Ledger(dataset_version="v1", trained_version="v1"), None, tmp_path, "v1")
    assert not plan.train and plan.reason == "nothing new since dataset version v1" and not plan.mark_trained
    first = plan_training(Ledger(), None, tmp_path, None)
    assert not first.train and first.reason == "nothing new since dataset version (none yet)"


def test_an_untrained_version_is_trained_on_without_new_data(tmp_path):
    snapshot(tmp_path, "v2", n=5)
    plan = plan_training(Ledger(dataset_version="v2", trained_version="v1"), None, tmp_path, "v1")
    assert plan.train and plan.dataset.version == "v2" and plan.dataset.n_examples == 5
    assert "never trained on" in plan.reason


def test_the_champions_own_data_is_not_trained_again_and_is_marked(tmp_path):
    new = snapshot(tmp_path, "v3")
    plan = plan_training(Ledger(dataset_version="v3"), new, tmp_path, "v3")
    assert not plan.train and plan.mark_trained and plan.dataset.version == "v3"
    assert plan_training(Ledger(dataset_version="v3"), new, tmp_path, "v2").train
