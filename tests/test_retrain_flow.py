"""The whole retrain flow under Prefect's test harness, with MLflow on a temporary SQLite store."""

import json

import pytest

from conftest import DEMO, DEMO_CONFIG
from tuneloop.core.config import load_config
from tuneloop.tasks.quality import QualityGateFailed

pytestmark = pytest.mark.slow


def small_config(tracking_uri: str, *extra: str):
    return load_config(DEMO_CONFIG, [
        "train.local.max_steps=60",
        "evaluate.max_examples=60",
        f"register.tracking_uri={tracking_uri}",
        *extra,
    ])


UI_INPUT_TYPES = {"task_run", "parameter", "constant"}  # what Prefect's UI (3.8) can read; else "No task runs"
# MLflow sorts chart sections by name, unprefixed metrics last: scores and the loss come first
FIRST_SECTIONS = ["eval", "loss"]


def what_the_uis_read(client, run, result) -> None:
    """What the Prefect UI and the MLflow UI show of one retrain run, read through their APIs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterId,
        FlowRunFilterParentTaskRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    flow_run_id = run.data.tags["prefect_flow_run_id"]
    with get_client(sync_client=True) as prefect:
        flow_run = prefect.read_flow_run(flow_run_id)
        by_flow = FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        task_runs = {t.id: t for t in prefect.read_task_runs(flow_run_filter=by_flow)}
        artifacts = prefect.read_artifacts(flow_run_filter=by_flow)
        by_name = {t.name.rsplit("-", 1)[0]: t for t in task_runs.values()}
        (training,) = prefect.read_flow_runs(flow_run_filter=FlowRunFilter(
            parent_task_run_id=FlowRunFilterParentTaskRunId(any_=[by_name["train-local"].id])))
        logs = [entry.message for entry in prefect.read_logs(
            LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id, training.id])), limit=200)]
    # the run's Task runs tab lists them: every input is of a type the UI reads, and the tasks that take the
    # trained model show train-local (its run in this flow) upstream
    assert {i.input_type for t in task_runs.values() for inputs in t.task_inputs.values() for i in inputs} <= UI_INPUT_TYPES
    for name in ("evaluate", "register"):
        upstream = {i.id for inputs in by_name[name].task_inputs.values() for i in inputs if i.input_type == "task_run"}
        assert by_name["train-local"].id in upstream, (name, by_name[name].task_inputs)
    assert flow_run.name == f"retrain-{result.dataset_version[:8]}"  # named by what it did
    assert training.name == f"train-local-{result.dataset_version[:8]}"
    # artifacts link to their task runs; no keyless result records
    assert {a.key for a in artifacts} == {"quality-gate", "evaluation", "promotion"}
    assert all(a.task_run_id in task_runs for a in artifacts)
    assert "/#/models/" in next(a.data for a in artifacts if a.key == "promotion")  # a link, not a SQLite path

    # MLflow: opens on runs; the run spans the pipeline, shows its data, its logged model, a description
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.experimentKind"] == "finetuning"
    first_task = min(t.start_time for t in task_runs.values()).timestamp() * 1000
    register = by_name["register"]
    assert run.info.start_time <= first_task and run.info.end_time >= register.start_time.timestamp() * 1000
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert set(inputs) == {"training", "validation", "evaluation"}
    assert inputs["training"].digest == result.dataset_version and json.loads(inputs["training"].profile)["num_rows"] > 0
    assert json.loads(inputs["training"].source)["uri"].endswith("train.jsonl")
    (output,) = run.outputs.model_outputs
    model = client.get_logged_model(output.model_id)
    assert model.source_run_id == run.info.run_id and model.status == "READY"
    version = client.get_model_version(result.model_version.name, result.model_version.version)
    assert version.source == f"models:/{model.model_id}"  # version → logged model → run
    files = {f.path for f in client.list_logged_model_artifacts(model.model_id)}
    assert "champion_model.py" in files and "python_model.pkl" not in files  # models from code: nothing unpickled
    assert json.loads(model.tags["mlflow.modelVersions"]) == [{"name": version.name, "version": version.version}]
    assert result.dataset_version in run.data.tags["mlflow.note.content"]
    assert run.data.tags["mlflow.source.name"] == "tuneloop retrain flow"

    # the loss, named honestly: a curve whose last point is the loss the model ended with, the mean apart
    curve = sorted(client.get_metric_history(run.info.run_id, "loss/train"), key=lambda m: m.step)
    assert len(curve) >= 2 and run.data.metrics["loss/train"] == curve[-1].value
    mean = run.data.metrics["loss/train_mean"]
    assert f"loss at the last step {curve[-1].value:.4f} (mean over training {mean:.4f})" in "\n".join(logs)
    sections = sorted({k.rsplit("/", 1)[0] for k in run.data.metrics if "/" in k})
    assert sections[:2] == FIRST_SECTIONS and all("/" in k for k in run.data.metrics), sections
    assert {f"eval/{who}_{m}" for who in ("base", "candidate") for m in result.report.candidate.metrics} <= set(
        run.data.metrics)


def test_retrain_registers_promotes_and_a_worse_run_leaves_the_champion(prefect_harness, home, tmp_path):
    from mlflow import MlflowClient

    from tuneloop.flows.retrain import retrain

    landing = home / "landing"
    landing.mkdir(parents=True)
    lines = (DEMO / "tickets.jsonl").read_text().splitlines(True)
    (landing / "tickets-1.jsonl").write_text("".join(lines[:800]))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"

    first = retrain(small_config(uri))
    client = MlflowClient(uri)
    name = first.model_version.name
    assert first.n_read == first.n_accepted + first.n_quarantined + first.n_duplicates
    assert first.n_quarantined == 2  # the empty and the overlong body are in the first 800 lines
    assert first.report.candidate.accuracy > first.report.base.accuracy
    assert first.model_version.decision.promoted
    assert str(client.get_model_version_by_alias(name, "champion").version) == first.model_version.version == "1"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "1"
    assert first.report.candidate.macro_f1 > first.report.base.macro_f1
    run = client.get_run(first.model_version.run_id)
    assert run.data.metrics["eval/candidate_accuracy"] == first.report.candidate.accuracy
    assert run.data.metrics["eval/base_accuracy"] == first.report.base.accuracy
    # the floors it had to clear: the base prompted with solved examples and the label set, the majority class
    assert first.report.n_shots == 4 and run.data.metrics["eval/prompted_accuracy"] == first.report.prompted.accuracy
    assert run.data.metrics["eval/majority_accuracy"] == first.report.majority.accuracy < first.report.candidate.accuracy
    assert first.report.majority_label and first.report.collapse is None
    assert run.data.tags["dataset_version"] == first.dataset_version
    assert len(client.get_metric_history(run.info.run_id, "loss/train")) >= 2
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"adapter", "dataset", "evaluation", "quality"} <= artifacts
    assert {a.path for a in client.list_artifacts(run.info.run_id, "dataset")} >= {
        "dataset/train.jsonl", "dataset/validation.jsonl", "dataset/manifest.json"}
    assert str(home) in run.info.artifact_uri  # artifacts live in the state folder, not the cwd
    assert run.data.metrics["tokens/train.n_examples"] == run.data.metrics["records/n_train"]
    assert 0 < run.data.metrics["tokens/train.p50"] <= run.data.metrics["tokens/train.max"]
    import mlflow.pyfunc

    champion = mlflow.pyfunc.load_model(f"models:/{name}@champion")  # one call, no tuneloop code needed
    held = [json.loads(line) for line in (DEMO / "holdout.jsonl").read_text().splitlines()[:3]]
    answers = champion.predict([f"Subject: {h['subject']}\n\n{h['body']}" for h in held])
    predictions = [json.loads(line) for line in first.report.predictions_path.read_text().splitlines()[:3]]
    assert answers == [p["candidate"]["text"] for p in predictions]  # what the evaluation saw
    version_tags = client.get_model_version(name, "1").tags
    assert version_tags["dataset_version"] == first.dataset_version  # every model leads back to its data
    assert version_tags["adapter_artifact"] == f"runs:/{run.info.run_id}/adapter" and version_tags["git_commit"]

    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "quality")}
    assert {"quality/quarantine.jsonl", "quality/duplicates.jsonl", "quality/quality_summary.json",
            "quality/data_docs"} <= artifacts
    assert run.data.metrics["records/n_quarantined"] == 2
    assert run.data.metrics["quality/raw_records/expect_column_value_lengths_to_be_between.body"] == 2

    what_the_uis_read(client, run, first)

    idle = retrain(small_config(uri))  # nothing new landed: ends early, trains nothing, registers nothing
    assert idle.status == "nothing_new" and idle.model_version is None
    assert idle.message == (f"nothing new since dataset version {first.dataset_version}, and it was trained on "
                            "with these settings; `tuneloop run --retrain` trains on it again")
    assert len(client.search_model_versions(f"name='{name}'")) == 1
    assert idle.run_dir is None and len(list((home / "runs").iterdir())) == 1  # no empty folder for a no-op

    (landing / "tickets-2.jsonl").write_text("".join(lines[800:1000]))
    worse = retrain(small_config(uri, "train.local.max_steps=0"))
    assert worse.n_read == 200 and worse.dataset_version != first.dataset_version
    assert not worse.model_version.decision.promoted
    assert worse.model_version.version == "2"
    assert "does not beat champion" in worse.model_version.decision.reason
    # the champion was re-scored on the same examples and scored what it scored when it was promoted
    assert worse.report.champion.accuracy == first.report.candidate.accuracy
    assert worse.report.champion_version == "1"
    assert str(client.get_model_version_by_alias(name, "champion").version) == "1"
    assert str(client.get_model_version_by_alias(name, "challenger").version) == "2"  # the newest candidate
    assert client.get_model_version(name, "2").tags["promoted"] == "False"
    run2 = client.get_run(worse.model_version.run_id)
    assert {"evaluation/confusion_candidate.png", "evaluation/confusion_champion.png"} <= {
        a.path for a in client.list_artifacts(run2.info.run_id, "evaluation")}
    assert "per_class/candidate_recall.billing" in run2.data.metrics and "eval/champion_macro_f1" in run2.data.metrics
    local = client.download_artifacts(run2.info.run_id, "evaluation/promotion_decision.json", str(tmp_path))
    decision = json.loads(open(local).read())
    assert decision["promoted"] is False and decision["deltas"]["accuracy"] == worse.model_version.decision.delta

    # A warm start continues the champion's adapter: at a vanishing learning rate the candidate *is* v1 again
    # (same answers, a tie, not promoted), and the registry says which champion it continued.
    (landing / "tickets-3.jsonl").write_text("".join(lines[1000:1100]))
    warm = retrain(small_config(uri, "train.local.init_from=champion", "train.local.max_steps=1",
                                "train.local.learning_rate=1e-12", "train.local.warmup_steps=0"))
    assert warm.model_version.version == "3" and not warm.model_version.decision.promoted
    assert client.get_model_version(name, "3").tags["warm_start_from"] == "1"
    assert warm.report.candidate.accuracy == warm.report.champion.accuracy == first.report.candidate.accuracy


def test_quality_gate_failure_stops_the_flow_before_training(prefect_harness, home, tmp_path):
    from mlflow import MlflowClient

    from tuneloop.flows.retrain import retrain

    landing = home / "landing"
    landing.mkdir(parents=True)
    (landing / "tickets.jsonl").write_bytes((DEMO / "tickets.jsonl").read_bytes())
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(QualityGateFailed, match="quality gate failed: 4 of 2407 records quarantined"):
        retrain(small_config(uri, "quality.max_quarantine_fraction=0.0"))
    assert MlflowClient(uri).search_registered_models() == []
    assert not (home / "models").exists() or not any((home / "models").iterdir())
    assert not (home / "consumed.json").exists()  # nothing consumed: the next run reads the file again


def test_an_unchanged_export_is_not_recomputed(prefect_harness, tmp_path):
    from prefect import flow

    from tuneloop.core.records import DatasetVersion
    from tuneloop.lib.datasets import version_of
    from tuneloop.tasks.export import export_task

    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}],
             "record_id": str(i), "source": "in.jsonl", "line": i + 1, "content_hash": f"{i:064x}"} for i in range(12)]
    import orjson

    path = tmp_path / "snap.jsonl"
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in rows))
    version = version_of([r["content_hash"] for r in rows])
    cfg = load_config(DEMO_CONFIG)

    @flow
    def export_twice(seed: int):
        dataset = DatasetVersion(version=version, path=path, n_examples=12)
        export = cfg.export.model_copy(update={"seed": seed})
        first = export_task(dataset, export, [], tmp_path / "exports", return_state=True)
        second = export_task(dataset, export, [], tmp_path / "exports", return_state=True)
        return first, second

    first, second = export_twice(seed=123)
    # reused by the export itself, after checking its files' hashes (not by Prefect's cache, which would not)
    assert first.is_completed() and not first.result().reused
    assert second.result().reused and second.result().sha256 == first.result().sha256
    first_again, _ = export_twice(seed=124)  # another split seed is another export
    assert not first_again.result().reused


def test_changed_settings_retrain_the_same_data_and_retrain_forces_a_run(prefect_harness, home, tmp_path):
    """Trying new settings on the data already collected needs no edit of the state folder."""
    from tuneloop.flows.retrain import retrain

    landing = home / "landing"
    landing.mkdir(parents=True)
    (landing / "t.jsonl").write_text("".join((DEMO / "tickets.jsonl").read_text().splitlines(True)[:300]))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    quick = ["train.local.max_steps=0", "evaluate.max_examples=10"]

    first = retrain(small_config(uri, *quick))
    assert first.status == "trained"
    same = retrain(small_config(uri, *quick))
    assert same.status == "nothing_new" and "trained on with these settings" in same.message
    changed = retrain(small_config(uri, *quick, "train.local.lora.r=8"))
    assert changed.status == "trained" and changed.dataset_version == first.dataset_version
    ledger = json.loads((home / "consumed.json").read_text())
    assert len(ledger["trained_settings"][first.dataset_version]) == 2
    assert ledger["last_settings"]["train.local.lora.r"] == "8"
    # a log line said what changed; the next run with the same settings does nothing again
    assert retrain(small_config(uri, *quick, "train.local.lora.r=8")).status == "nothing_new"
    forced = retrain(small_config(uri, *quick, "train.local.lora.r=8"), force=True)
    assert forced.status == "trained" and forced.model_version.version == "3"
