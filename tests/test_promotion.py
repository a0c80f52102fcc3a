from pathlib import Path

import pytest

from tuneloop.core.config import EvaluateConfig, RegisterConfig
from tuneloop.core.records import EvalReport, ModelScore, TuneloopError
from tuneloop.lib.candidate_run import flatten
from tuneloop.lib.promotion import decide_promotion


def decide(r: EvalReport, min_improvement: float = 0.0, primary: str = "accuracy",
           guards: dict[str, float] | None = None):
    evaluate = EvaluateConfig(holdout="holdout.jsonl", primary_metric=primary, guards=guards or {})
    return decide_promotion(r, evaluate, RegisterConfig(min_improvement=min_improvement), r.champion is not None)


def report(base: float, candidate: float, champion: float | None = None) -> EvalReport:
    s = lambda a: ModelScore(accuracy=a, n_examples=100, n_unparsed=0)  # noqa: E731
    return EvalReport(n_examples=100, base=s(base), candidate=s(candidate),
                      champion=None if champion is None else s(champion),
                      champion_version=None if champion is None else "1", predictions_path=Path("p.jsonl"))


@pytest.mark.parametrize("r,min_improvement,promoted,baseline", [
    (report(0.1, 0.8), 0.0, True, "base"),            # first model: must beat the base
    (report(0.5, 0.5), 0.0, False, "base"),           # first model no better than base
    (report(0.1, 0.9, 0.8), 0.0, True, "champion"),   # better than the champion
    (report(0.1, 0.8, 0.8), 0.0, False, "champion"),  # a tie keeps the champion
    (report(0.1, 0.7, 0.8), 0.0, False, "champion"),  # worse
    (report(0.1, 0.81, 0.8), 0.02, False, "champion"),  # better, but by less than required
    (report(0.1, 0.83, 0.8), 0.02, True, "champion"),
])
def test_promotion_only_when_strictly_better_by_the_required_margin(r, min_improvement, promoted, baseline):
    decision = decide(r, min_improvement)
    assert decision.promoted is promoted
    assert decision.baseline == baseline
    assert baseline in decision.reason and ("does not beat" in decision.reason) is (not promoted)


def test_flatten_makes_dotted_params():
    assert flatten({"a": {"b": 1, "c": {"d": [1, 2]}}, "e": None}) == {"a.b": "1", "a.c.d": "[1, 2]", "e": "None"}


def scored(acc: float, f1: float) -> ModelScore:
    return ModelScore(accuracy=acc, macro_f1=f1, n_examples=100, n_unparsed=0)


def test_a_guard_regression_blocks_promotion_even_when_the_primary_metric_improves():
    r = EvalReport(n_examples=100, base=scored(0.1, 0.1), candidate=scored(0.9, 0.70), champion=scored(0.8, 0.75),
                   champion_version="1", predictions_path=Path("p.jsonl"))
    assert decide(r).promoted  # no guard: accuracy decides
    blocked = decide(r, guards={"macro_f1": 0.02})
    assert not blocked.promoted and blocked.guard_failures == ["macro_f1 -0.050 (allowed -0.020)"]
    assert "guard regressed: macro_f1 -0.050" in blocked.reason and blocked.deltas["accuracy"] == 0.1
    assert decide(r, guards={"macro_f1": 0.06}).promoted  # within tolerance
    by_f1 = decide(r, primary="macro_f1")
    assert not by_f1.promoted and by_f1.primary_metric == "macro_f1" and by_f1.delta == -0.05


def test_a_champion_the_evaluation_did_not_score_is_refused_not_compared_with_the_base():
    r = report(0.1, 0.8)
    with pytest.raises(TuneloopError, match="did not score it"):
        decide_promotion(r, EvaluateConfig(holdout="holdout.jsonl"), RegisterConfig(), has_champion=True)


def test_scores_per_class_and_macro_f1_and_the_confusion_png(tmp_path):
    from tuneloop.lib.heldout import HeldOutExample
    from tuneloop.lib.metrics import confusion_png, score

    examples = [HeldOutExample(record_id=str(i), prompt=[], expected="", label=lab)
                for i, lab in enumerate(["a", "a", "b", "b"])]
    s = score(["a", "b", "b", None], examples)
    assert s.accuracy == 0.5 and s.n_unparsed == 1
    assert s.per_class["a"] == {"precision": 1.0, "recall": 0.5, "f1": 0.6667, "support": 2}
    assert s.per_class["b"] == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "support": 2}
    assert s.macro_f1 == round((2 / 3 + 0.5) / 2, 4)
    png = confusion_png(["a", "b", "b", None], examples, "t", tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_promote_rollback_and_models_on_a_real_registry(tmp_path):
    import json
    import subprocess
    import sys

    from mlflow import MlflowClient

    from conftest import ROOT

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    client.create_registered_model("m")
    for i, acc in enumerate(["0.5", "0.7", "0.6"], start=1):
        (tmp_path / f"a{i}").mkdir()
        client.create_model_version("m", source=str(tmp_path / f"a{i}"),
                                    tags={"candidate_accuracy": acc, "dataset_version": f"d{i}"})
    env = {"TUNELOOP_HOME": str(tmp_path / "home"), "PATH": "", "DO_NOT_TRACK": "true",
           "MLFLOW_DISABLE_TELEMETRY": "true"}

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "tuneloop.app.cli", *args, "--set", "register.model_name=m",
                               "--set", f"register.tracking_uri={uri}"], cwd=ROOT, env=env, capture_output=True, text=True)

    assert cli("promote", "1", "--reason", "first").returncode == 0
    out = cli("promote", "2", "--reason", "better on the new queue")
    assert out.returncode == 0 and "champion is now version 2 (was 1)" in out.stdout
    assert str(client.get_model_version_by_alias("m", "champion").version) == "2"
    tags = client.get_model_version("m", "2").tags
    assert tags["champion_reason"] == "better on the new queue" and tags["previous_champion"] == "1"
    assert tags["champion_set_by"]

    back = cli("rollback", "--reason", "complaints")
    assert back.returncode == 0 and "rolled back from version 2 to version 1" in back.stdout
    assert str(client.get_model_version_by_alias("m", "champion").version) == "1"
    assert client.get_model_version("m", "2").tags["rolled_back_reason"] == "complaints"
    again = cli("rollback")
    assert again.returncode == 1 and "no earlier champion" in again.stderr and "Traceback" not in again.stderr

    listing = json.loads(cli("models", "--json").stdout)
    assert [(v["version"], v["aliases"], v["accuracy"]) for v in listing["versions"]] == [
        ("1", ["champion"], "0.5"), ("2", [], "0.7"), ("3", [], "0.6")]
    missing = cli("promote", "9")
    assert missing.returncode == 1 and "has no version '9' (versions: 1, 2, 3)" in missing.stderr


def test_generation_metrics_exact_match_rouge_l_and_bleu():
    from tuneloop.lib.heldout import HeldOutExample
    from tuneloop.lib.metrics import score

    examples = [HeldOutExample(record_id=str(i), prompt=[{"role": "user", "content": f"q{i}"}], expected=exp, label=None)
                for i, exp in enumerate(["reset your password from the login page", "we refunded the invoice"])]
    perfect = score([None, None], examples, [e.expected for e in examples], task="generation")
    assert (perfect.exact_match, perfect.rouge_l, perfect.bleu) == (1.0, 1.0, 1.0)
    partial = score([None, None], examples, ["Reset your  password from the login page", "sorry, no idea"],
                    task="generation")
    assert partial.exact_match == 0.5 and partial.rouge_l == 0.5 and 0 < partial.bleu < 1.0  # ROUGE: 1.0 and 0.0
    assert partial.accuracy is partial.macro_f1 is None and partial.per_class == {}  # no label metrics


def test_the_llm_judge_grades_through_an_openai_compatible_endpoint(monkeypatch):
    from fake_openai import FakeOpenAI

    from tuneloop.core.config import JudgeConfig
    from tuneloop.lib.answerers import judge_grade
    from tuneloop.lib.heldout import HeldOutExample

    monkeypatch.setenv("JUDGE_KEY", "sk-judge-0123456789")
    seen = []
    examples = [HeldOutExample(record_id=str(i), prompt=[{"role": "user", "content": f"ticket {i}"}],
                               expected="the reference", label=None) for i in range(4)]
    with FakeOpenAI(answer=lambda model, messages: seen.append((model, messages)) or
                    ("5" if "good answer" in messages[-1]["content"] else "Grade: 2")) as fake:
        judge = JudgeConfig(model="judge-model", base_url=fake.base_url, api_key_env="JUDGE_KEY")
        grade = judge_grade(judge, examples, ["good answer", "good answer", "meh", "meh"])
    assert grade == round((1.0 + 1.0 + 0.25 + 0.25) / 4, 4)
    model, messages = seen[0]
    assert model == "judge-model" and messages[0]["content"] == judge.rubric
    assert "Reference answer:\nthe reference" in messages[1]["content"] and "ticket" in messages[1]["content"]


def test_metrics_the_config_cannot_compute_are_refused_up_front():
    from conftest import DEMO_CONFIG
    from tuneloop.core.config import load_config
    from tuneloop.core.records import TuneloopError

    with pytest.raises(TuneloopError, match="uses 'judge': configure evaluate.judge"):
        load_config(DEMO_CONFIG, ["evaluate.task=generation", "evaluate.primary_metric=judge"])
    with pytest.raises(TuneloopError, match="macro_f1 needs labels"):
        load_config(DEMO_CONFIG, ["evaluate.task=generation", "evaluate.guards={macro_f1: 0.1}"])
    assert load_config(DEMO_CONFIG, ["evaluate.task=generation", "evaluate.primary_metric=rouge_l"]).evaluate.task == "generation"


def _heldout(labels: list[str]):
    from tuneloop.lib.heldout import HeldOutExample

    return [HeldOutExample(record_id=str(i), prompt=[{"role": "user", "content": "t"}], expected=f"queue: {lab}",
                           label=lab) for i, lab in enumerate(labels)]


def test_the_majority_class_baseline_is_the_training_splits_most_common_label(tmp_path):
    """The floor: always answering the training split's most common label, scored on the held-out set."""
    import json
    import re

    from tuneloop.lib.metrics import majority_baseline, training_labels

    train = tmp_path / "train.jsonl"
    answers = ["queue: billing"] * 5 + ["queue: access"] * 3 + ["no label here"]
    train.write_text("".join(json.dumps({"messages": [{"role": "user", "content": "t"},
                                                      {"role": "assistant", "content": a}]}) + "\n" for a in answers))
    labels = training_labels(train, re.compile(r"^queue: (\S+)"))
    assert labels == ["billing"] * 5 + ["access"] * 3
    heldout = _heldout(["access"] * 6 + ["billing"] * 4)  # the held-out set's own majority is another label
    label, scored = majority_baseline(labels, heldout)
    assert label == "billing" and scored.accuracy == 0.4 and scored.macro_f1 == pytest.approx(0.2857, abs=1e-3)
    assert majority_baseline([], heldout)[0] == "access"  # no training split: the held-out set's


def test_a_candidate_that_answers_one_label_for_nearly_everything_has_collapsed():
    from tuneloop.lib.metrics import collapse

    heldout = _heldout(["billing"] * 16 + [f"other{i % 6}" for i in range(84)])
    said = collapse(["billing"] * 99 + ["other1"], heldout, 0.9)
    assert said == "'billing' for 99 of 100 answers (99%); it is 16% of the references"
    assert collapse(["billing"] * 85 + ["other1"] * 15, heldout, 0.9) is None  # below the share
    skewed = _heldout(["billing"] * 95 + ["access"] * 5)
    assert collapse(["billing"] * 96 + ["access"] * 4, skewed, 0.9) is None  # the data's own prior is no collapse
    assert collapse(["billing"] * 99 + ["other1"], heldout, None) is None  # not checked


def test_a_candidate_must_beat_the_majority_class_and_not_have_collapsed():
    """The real-model issue's case: 0.17 beats the base's 0.00, but always answering the most common label
    scores 0.20, and 99 of 100 answers were one label: refused, saying both."""
    r = report(0.0, 0.17).model_copy(update={"majority": ModelScore(accuracy=0.2, n_examples=100, n_unparsed=0),
                                             "majority_label": "billing",
                                             "collapse": "'billing' for 99 of 100 answers (99%); it is 16% of the references"})
    decision = decide(r)
    assert not decision.promoted
    assert "does not beat the majority-class baseline (always 'billing': 0.200)" in decision.reason
    assert "collapsed onto one label: 'billing' for 99 of 100" in decision.reason
    assert len(decision.guard_failures) == 2
    fine = r.model_copy(update={"candidate": ModelScore(accuracy=0.6, n_examples=100, n_unparsed=0), "collapse": None})
    assert decide(fine).promoted
    evaluate = EvaluateConfig(holdout="holdout.jsonl")
    off = decide_promotion(r, evaluate, RegisterConfig(beat_majority=False), False)
    assert off.promoted and off.guard_failures == []


def test_the_prompted_baseline_shows_each_label_once_with_its_answer_cut_at_the_label(tmp_path):
    """lib/fewshot.py: the shortest example of each label, most common labels first, answers cut where the
    scored part ends; the label set in the system message; shots dropped from the end until it fits."""
    import json
    import re

    from tuneloop.lib.fewshot import prompted_baseline

    rows = [("billing", "charged twice for March", "Sorry, refunded."), ("billing", "refund", "Done."),
            ("access", "cannot log in since the reset, please help", "Reset link sent."),
            ("billing", "invoice missing from the portal", "Attached."), ("sync", "files stuck", "Restart it.")]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"messages": [{"role": "system", "content": "Route it."},
                                                      {"role": "user", "content": u},
                                                      {"role": "assistant", "content": f"queue: {lab}\n{a}"}]}) + "\n"
                             for lab, u, a in rows))
    baseline = prompted_baseline(train, 4, "classification", re.compile(r"^queue: (\S+)", re.M))
    assert baseline.labels == ["access", "billing", "sync"]
    assert [s[0]["content"] for s in baseline.shots] == ["refund", "cannot log in since the reset, please help",
                                                         "files stuck", "charged twice for March"]
    assert [s[-1]["content"] for s in baseline.shots] == ["queue: billing", "queue: access", "queue: sync",
                                                          "queue: billing"]
    held = _heldout(["access"])[0].model_copy(update={"prompt": [{"role": "system", "content": "Route it."},
                                                                 {"role": "user", "content": "locked out"}]})
    (asked,) = baseline.prompts([held], fits=lambda messages: len(messages) <= 6)  # room for 2 shots
    assert asked.prompt[0] == {"role": "system", "content": "Route it.\n\nAnswer with one of these labels: access, "
                                                            "billing, sync."}
    assert [m["content"] for m in asked.prompt[1:]] == ["refund", "queue: billing",
                                                        "cannot log in since the reset, please help", "queue: access",
                                                        "locked out"]
    assert baseline.used == [2]  # the label says what was asked: not "4-shot" when only 2 fit
    roomy = held.model_copy(update={"record_id": "roomy", "prompt": [held.prompt[0], {"role": "user", "content": "x"}]})
    baseline.prompts([held, roomy], fits=lambda messages: len(messages) <= 6 or messages[-1]["content"] == "x")
    assert baseline.used == [2, 4]
    shown = report(0.0, 0.5).model_copy(update={"n_shots": 4, "n_shots_min": 2})
    assert shown.shots == "2-4-shot" and report(0.0, 0.5).model_copy(update={"n_shots": 4}).shots == "4-shot"
    assert prompted_baseline(train, 0, "classification", re.compile(r"^queue: (\S+)", re.M)) is None


def test_a_candidate_must_beat_the_prompted_base_model():
    r = report(0.0, 0.5).model_copy(update={"prompted": ModelScore(accuracy=0.6, n_examples=100, n_unparsed=0),
                                            "n_shots": 4})
    decision = decide(r)
    assert not decision.promoted
    assert "does not beat the prompted base model (4 solved examples in its prompt: 0.600)" in decision.reason
    assert decide(r.model_copy(update={"candidate": ModelScore(accuracy=0.7, n_examples=100, n_unparsed=0)})).promoted
