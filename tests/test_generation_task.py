"""Each task is reported in its own metrics: generation in exact match / ROUGE-L / BLEU (and the judge),
classification in accuracy / macro-F1, never a number the task did not compute (issue 16, point 5)."""

import json
from pathlib import Path

import pytest

from conftest import DEMO, DEMO_CONFIG
from tuneloop.core.config import load_config
from tuneloop.core.records import (
    EvalReport,
    ExportedDataset,
    LocalAdapter,
    PromotionDecision,
    TuneloopError,
)
from tuneloop.lib.heldout import HeldOutExample

LABEL_METRICS = ("accuracy", "macro_f1", "precision", "recall", "f1.", "unparsed")
TEXT_METRICS = ("exact_match", "rouge_l", "bleu", "judge")


def classification_report(tmp_path: Path) -> EvalReport:
    from tuneloop.lib.metrics import score

    examples = [HeldOutExample(record_id=str(i), prompt=[{"role": "user", "content": f"q{i}"}],
                               expected=f"queue: {lab}\nThanks, we are on it.", label=lab)
                for i, lab in enumerate(["billing", "billing", "login", "login"])]
    # answers cut at the label, as the answer budget sizes them for classification
    texts = ["queue: billing", "queue: login", "queue: login", "queue:"]
    labels = ["billing", "login", "login", None]
    s = score(labels, examples, texts, "classification")
    return EvalReport(n_examples=4, base=s, candidate=s, predictions_path=tmp_path / "p.jsonl")


def test_classification_reports_no_exact_match_or_bleu_of_answers_cut_at_the_label(tmp_path):
    from tuneloop.lib.candidate_run import run_metrics
    from tuneloop.tasks.evaluate import comparison_markdown

    report = classification_report(tmp_path)
    s = report.candidate
    assert s.accuracy == 0.5 and s.n_unparsed == 1 and set(s.per_class) == {"billing", "login"}
    assert s.exact_match is s.rouge_l is s.bleu is s.judge is None
    assert list(s.metrics) == ["accuracy", "macro_f1"]
    assert not set(TEXT_METRICS) & set(s.model_dump())  # report.json and Prefect results hold no such field

    exported = ExportedDataset(dataset_version="d", directory=tmp_path, train_path=tmp_path / "t",
                               validation_path=tmp_path / "v", manifest_path=tmp_path / "m", n_train=4,
                               n_validation=1, sha256={})
    trained = LocalAdapter(base_model="tiny", dataset_version="d", steps=1, train_loss=None,
                           train_seconds=1.0)
    decision = PromotionDecision(promoted=True, reason="r", baseline="base", delta=0.1, deltas={"accuracy": 0.1})
    logged = {m.key for m in run_metrics(None, exported, trained, report, decision)}
    assert {"eval/candidate_accuracy", "eval/candidate_macro_f1", "eval/base_accuracy", "per_class/candidate_f1.billing"} <= logged
    assert not [k for k in logged if any(t in k for t in TEXT_METRICS)]

    markdown = comparison_markdown(report)
    assert "| model | accuracy | macro-F1 | unparsed answers |" in markdown and "Candidate per class" in markdown
    assert not any(t in markdown for t in ("exact match", "ROUGE", "BLEU", "judge"))
    from tuneloop.app.report import score_table

    columns = [c.header for c in score_table(report).columns]  # the CLI summary's table
    assert columns == ["model", "accuracy", "macro-F1"]


def test_a_metric_outside_the_task_is_refused_with_one_line():
    with pytest.raises(TuneloopError) as refused:
        load_config(DEMO_CONFIG, ["evaluate.primary_metric=rouge_l"])
    reason = str(refused.value).splitlines()[-1]
    assert "evaluate.primary_metric names rouge_l, which a classification task does not compute" in reason
    assert "use them with evaluate.task: generation" in reason
    with pytest.raises(TuneloopError, match="evaluate.guards names bleu, exact_match, which a classification task"):
        load_config(DEMO_CONFIG, ["evaluate.guards={bleu: 0.1, exact_match: 0.1}"])
    with pytest.raises(TuneloopError, match="names accuracy, which a generation task .*accuracy needs labels"):
        load_config(DEMO_CONFIG, ["evaluate.task=generation", "evaluate.primary_metric=accuracy"])
    with pytest.raises(TuneloopError, match="evaluate.judge grades free-text answers: use it with evaluate.task: gen"):
        load_config(DEMO_CONFIG, ["evaluate.judge={model: judge-model}"])
    assert load_config(DEMO_CONFIG, ["evaluate.task=generation"]).evaluate.primary_metric == "rouge_l"
    assert load_config(DEMO_CONFIG).evaluate.primary_metric == "accuracy"


@pytest.mark.slow
def test_a_generation_run_prints_logs_and_registers_generation_metrics_only(prefect_harness, home, tmp_path,
                                                                            capsys, monkeypatch):
    from mlflow import MlflowClient
    from prefect.artifacts import Artifact
    from typer.testing import CliRunner

    from tuneloop.app.cli import app
    from tuneloop.app.report import print_retrain_summary
    from tuneloop.core.state import StateLayout
    from tuneloop.flows.retrain import retrain
    from tuneloop.lib.registry import ModelRegistry
    from tuneloop.tasks.drift import check_drift

    landing = home / "landing"
    landing.mkdir(parents=True)
    lines = (DEMO / "tickets.jsonl").read_text().splitlines(True)
    (landing / "tickets-1.jsonl").write_text("".join(lines[:200]))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    overrides = ["evaluate.task=generation", "train.local.max_steps=6", "train.local.batch_size=2",
                 "evaluate.max_examples=12", f"register.tracking_uri={uri}", "register.model_name=replies",
                 "drift.min_examples=8", "drift.window=10"]
    config = load_config(DEMO_CONFIG, overrides)

    result = retrain(config)
    print_retrain_summary(result, StateLayout(home))  # what `tuneloop run` prints
    summary = capsys.readouterr().out
    assert "accuracy" not in summary and "macro-F1" not in summary
    assert "Held-out generation scores (12 examples)" in summary
    assert all(t in summary for t in ("exact match", "ROUGE-L", "BLEU"))

    report = result.report
    for s in (report.base, report.candidate):
        assert s.accuracy is s.macro_f1 is s.n_unparsed is None and s.per_class == {}
        assert list(s.metrics) == ["exact_match", "rouge_l", "bleu"]
    assert report.task == "generation" and config.evaluate.primary_metric == "rouge_l"
    assert result.model_version.decision.primary_metric == "rouge_l"
    assert set(result.model_version.decision.deltas) == {"exact_match", "rouge_l", "bleu"}

    rows = [json.loads(line) for line in report.predictions_path.read_text().splitlines()]
    assert len(rows) == 12
    for row in rows:
        assert row["expected"].startswith("queue: ") and "\n" in row["expected"]  # the whole reference answer
        assert set(row["candidate"]) == set(row["base"]) == {"text", "rouge_l"}
        assert 0.0 <= row["candidate"]["rouge_l"] <= 1.0
    assert round(sum(r["candidate"]["rouge_l"] for r in rows) / 12, 2) == round(report.candidate.rouge_l, 2)

    client = MlflowClient(uri)
    run = client.get_run(result.model_version.run_id)
    assert run.data.metrics["eval/candidate_rouge_l"] == report.candidate.rouge_l
    assert {"eval/base_bleu", "eval/candidate_bleu", "eval/candidate_exact_match", "promotion_delta/rouge_l"} <= set(run.data.metrics)
    assert not [k for k in run.data.metrics if any(t in k for t in LABEL_METRICS)]
    tags = client.get_model_version("replies", result.model_version.version).tags
    assert tags["task"] == "generation" and float(tags["candidate_rouge_l"]) == report.candidate.rouge_l
    assert not [k for k in tags if any(t in k for t in LABEL_METRICS)]
    evaluation = {a.path for a in client.list_artifacts(run.info.run_id, "evaluation")}
    assert not [p for p in evaluation if "confusion" in p]
    saved = json.loads(Path(client.download_artifacts(run.info.run_id, "evaluation/report.json", str(tmp_path)))
                       .read_text())
    assert saved["task"] == "generation" and "per_class" not in saved["candidate"]
    assert not set(saved["candidate"]) & {"accuracy", "macro_f1", "n_unparsed"}
    worst = report.worst["candidate"]
    assert worst and set(worst[0]) == {"record_id", "input", "expected", "answer", "rouge_l"}

    markdown = Artifact.get("evaluation").data  # the Prefect artifact of the run's evaluate task
    assert "(generation)" in markdown and "| model | exact match | ROUGE-L | BLEU |" in markdown
    assert "lowest ROUGE-L" in markdown
    assert not any(t in markdown for t in ("accuracy", "macro-F1", "per class", "unparsed"))

    monkeypatch.setenv("COLUMNS", "200")
    listing = CliRunner().invoke(app, ["models", "--set", "register.model_name=replies",
                                       "--set", f"register.tracking_uri={uri}"])
    assert listing.exit_code == 0, listing.output
    header = next(line for line in listing.output.splitlines() if "version" in line)
    assert "ROUGE-L" in header and "BLEU" in header and "exact match" in header
    assert "accuracy" not in listing.output and "macro-F1" not in listing.output
    as_json = json.loads(CliRunner().invoke(app, ["models", "--json", "--set", "register.model_name=replies",
                                                  "--set", f"register.tracking_uri={uri}"]).output)
    version = as_json["versions"][0]
    assert version["task"] == "generation" and "rouge_l" in version and "accuracy" not in version

    # the drift monitor watches the primary metric, ROUGE-L, on tickets that landed since
    ModelRegistry(uri, "replies").promote(result.model_version.version, "test", "watch it")
    (landing / "tickets-2.jsonl").write_text("".join(lines[200:212]))
    drift = check_drift(config, StateLayout(home), ModelRegistry(uri, "replies"), tmp_path / "drift")
    assert drift.metric == "rouge_l" and drift.at_promotion == report.candidate.rouge_l
    assert drift.recent_value is not None and 0.0 <= drift.recent_value <= 1.0
