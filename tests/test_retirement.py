"""Retirement dates as data: which provider table entry applies to a model id, how it is said, and where a
person meets it (tuneloop models, the drift report, the evaluation artifact), up to the migration event the
drift monitor emits and the retrain trigger that answers it. Real MLflow (SQLite), real Prefect."""

from __future__ import annotations

import json
from datetime import date, timedelta
from pathlib import Path

import pytest
import yaml

from conftest import DEMO_CONFIG, ROOT
from tuneloop.core.config import RetirementConfig, load_config
from tuneloop.core.lineage import Lineage
from tuneloop.core.records import TuneloopError
from tuneloop.core.retirement import (
    base_of,
    champion_warning,
    migration_due,
    retirement_of,
    table_entry,
    training_closes_note,
    version_retirement,
    within_warning,
)

MODEL = "lumenfold-support"  # the demo config's register.model_name
FINE_TUNE = "ft:gpt-4o-mini-2024-07-18:acme:support:abc123"
TODAY = date(2026, 11, 22)


# ---- lookup and description -----------------------------------------------------------------------------


def test_the_default_tables_hold_the_announced_dates():
    config = RetirementConfig()
    for base in ("gpt-4o-2024-08-06", "gpt-4o-mini-2024-07-18", "gpt-4.1-2025-04-14", "gpt-4.1-mini-2025-04-14"):
        assert config.openai[base] == date(2027, 1, 14) and config.azure[base] == date(2027, 10, 14)
    assert (config.openai_training_closes, config.warn_days, config.migrate_days) == (date(2027, 1, 6), 90, 30)


def test_a_model_id_takes_its_exact_entry_else_the_longest_prefix_of_its_own_family():
    table = {"gpt-4o": date(2027, 1, 1), "gpt-4o-mini": date(2027, 2, 2), "gpt-4.1-2025-04-14": date(2027, 3, 3)}
    assert table_entry("gpt-4.1-2025-04-14", table) == "gpt-4.1-2025-04-14"  # exact
    assert table_entry("gpt-4o-2024-08-06", table) == "gpt-4o"  # a dated snapshot of the family
    assert table_entry("gpt-4o-mini-2024-07-18", table) == "gpt-4o-mini"  # the longest, not gpt-4o
    assert table_entry("gpt-4o-mini-2024-07-18", {"gpt-4o": date(2027, 1, 1)}) is None  # never gpt-4o's entry
    assert table_entry("gpt-4.1-mini-2025-04-14", table) is None  # another model, not a snapshot of gpt-4.1
    assert table_entry("gpt-4o-mini-2024-07-18.ft-0e208cf3", {"gpt-4o-mini-2024-07-18": date(2027, 1, 1)}) \
        == "gpt-4o-mini-2024-07-18"  # an Azure fine-tune's name
    assert base_of(FINE_TUNE) == "gpt-4o-mini-2024-07-18" and base_of("gpt-4o") == "gpt-4o"


def test_the_provider_picks_the_table_and_unknown_models_or_providers_have_no_date():
    config = RetirementConfig()
    openai = retirement_of(FINE_TUNE, "openai", config)
    assert (openai.entry, openai.on, openai.model) == ("gpt-4o-mini-2024-07-18", date(2027, 1, 14), FINE_TUNE)
    azure = retirement_of("gpt-4.1-2025-04-14.ft-5d1c", "azure", config)
    assert (azure.entry, azure.on, azure.provider) == ("gpt-4.1-2025-04-14", date(2027, 10, 14), "azure")
    assert retirement_of("ft:gpt-3.5-turbo-0125:acme::x", "openai", config) is None  # not in the table
    assert retirement_of(FINE_TUNE, "compatible", config) is None  # a self-hosted endpoint: no table
    assert retirement_of(None, "openai", config) is None
    local = Lineage.from_tags({"backend": "local", "base_model": "gpt-4o-mini-2024-07-18"})
    assert version_retirement(local, config, "openai") is None  # an adapter here never retires
    tagged = Lineage.from_tags({"backend": "openai", "fine_tuned_model": FINE_TUNE, "openai_provider": "azure"})
    assert version_retirement(tagged, config, "openai").on == date(2027, 10, 14)  # the version's own provider wins
    untagged = Lineage.from_tags({"backend": "openai", "base_model": "gpt-4o-2024-08-06"})
    assert version_retirement(untagged, config, "azure").provider == "azure"  # else the config's


def test_descriptions_count_days_forward_and_back():
    when = retirement_of(FINE_TUNE, "openai", RetirementConfig())
    assert when.describe(TODAY) == "shuts down 2027-01-14, in 53 days"
    assert when.describe(date(2027, 1, 13)) == "shuts down 2027-01-14, in 1 day"
    assert when.describe(date(2027, 1, 14)) == "shuts down 2027-01-14, today"
    assert when.describe(date(2027, 1, 17)) == "shut down 2027-01-14, 3 days ago"
    assert when.days_left(date(2027, 1, 17)) == -3
    config = RetirementConfig()
    assert within_warning(when, config, TODAY) and not within_warning(when, config, date(2026, 10, 1))
    assert within_warning(when, config, date(2027, 2, 1))  # past is the loudest warning of all
    assert migration_due(10, config) and migration_due(-3, config) and not migration_due(31, config)
    assert not migration_due(5, RetirementConfig(migrate_days=0)) and not migration_due(None, config)
    assert training_closes_note("openai", config, TODAY) == "OpenAI takes no new fine-tuning jobs from 2027-01-06 " \
        "(in 45 days)"
    assert training_closes_note("azure", config, TODAY) == ""
    line = champion_warning("2", when, config, TODAY)
    assert line.startswith(f"champion v2 ({FINE_TUNE}, openai) shuts down 2027-01-14, in 53 days: ")


def test_the_config_reads_dates_from_yaml_and_they_do_not_change_the_model():
    plain = load_config(DEMO_CONFIG)
    moved = load_config(DEMO_CONFIG, ["retirement.openai={gpt-4o-mini-2024-07-18: 2027-03-01}",
                                      "retirement.warn_days=30"])
    assert moved.retirement.openai == {"gpt-4o-mini-2024-07-18": date(2027, 3, 1)}  # the table is replaced
    assert moved.config_hash() == plain.config_hash() and moved.settings_hash() == plain.settings_hash()
    with pytest.raises(TuneloopError, match="retirement.openai.gpt-4o"):
        load_config(DEMO_CONFIG, ["retirement.openai={gpt-4o: next week}"])


# ---- where a person looks -------------------------------------------------------------------------------


def api_champion_registry(tmp_path: Path, provider: str = "openai") -> str:
    """Version 1 a local adapter, version 2 (champion) an OpenAI fine-tune, tagged as register.py tags them."""
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp = client.create_experiment(MODEL, artifact_location=(tmp_path / "artifacts").as_uri())
    client.create_registered_model(MODEL)
    for i, tags in enumerate([{"backend": "local", "base_model": "tiny"},
                              {"backend": "openai", "base_model": "gpt-4o-mini-2024-07-18", "fine_tuned_model": FINE_TUNE,
                               "openai_job_id": "ftjob-1", "openai_provider": provider}], start=1):
        run = client.create_run(exp)
        client.log_metric(run.info.run_id, "candidate_accuracy", 0.6 + i / 10)
        (tmp_path / f"m{i}").mkdir()
        client.create_model_version(MODEL, source=str(tmp_path / f"m{i}"), run_id=run.info.run_id, tags={
            **tags, "task": "classification", "candidate_accuracy": str(0.6 + i / 10), "dataset_version": f"d{i}"})
    client.set_registered_model_alias(MODEL, "champion", "2")
    return uri


def test_tuneloop_models_shows_when_the_api_champion_stops_answering(home, tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from tuneloop.app.cli import app

    uri = api_champion_registry(tmp_path)
    monkeypatch.setenv("COLUMNS", "220")
    soon = (date.today() + timedelta(days=20)).isoformat()

    def models(*args: str, retires: str):
        return CliRunner().invoke(app, ["models", "--set", f"register.tracking_uri={uri}", "--set",
                                        f"retirement.openai={{gpt-4o-mini-2024-07-18: {retires}}}", *args])

    shown = models(retires=soon)
    assert shown.exit_code == 0, shown.output
    assert "retires" in shown.output and f"{soon} (in 20 days)" in shown.output
    assert f"warning: champion v2 ({FINE_TUNE}, openai) shuts down {soon}, in 20 days" in shown.output
    listing = json.loads(models("--json", retires=soon).stdout)
    local, api = listing["versions"]
    assert local["retirement"] is None and api["retirement"]["days_left"] == 20
    assert api["retirement"]["date"] == soon and api["retirement"]["provider"] == "openai"
    assert listing["retirement_warning"].startswith(f"champion v2 ({FINE_TUNE}, openai) shuts down {soon}")
    later = (date.today() + timedelta(days=200)).isoformat()
    calm = models(retires=later)
    assert f"{later} (in 200 days)" in calm.output and "warning" not in calm.output  # beyond warn_days: a column


def test_the_drift_report_carries_the_champions_retirement_to_markdown_and_mlflow(home, tmp_path):
    from mlflow import MlflowClient

    from tuneloop.core.state import StateLayout
    from tuneloop.lib.registry import ModelRegistry
    from tuneloop.tasks.drift import check_drift, drift_markdown, log_drift

    uri = api_champion_registry(tmp_path, provider="azure")
    (home / "landing").mkdir(parents=True)
    config = load_config(DEMO_CONFIG, [f"register.tracking_uri={uri}"])
    registry = ModelRegistry(uri, config.registry.model_name)
    report = check_drift(config, StateLayout(home), registry, tmp_path / "work", today=date(2027, 9, 14))
    assert report.note.endswith("no verdict")  # nothing new to score: the retirement is reported anyway
    assert (report.champion_model, report.champion_provider, report.retires_on, report.retirement_days_left) == (
        FINE_TUNE, "azure", date(2027, 10, 14), 30)
    assert report.retirement_warning.startswith(f"champion v2 ({FINE_TUNE}, azure) shuts down 2027-10-14, in 30 days")
    text = drift_markdown(report)
    assert f"**Retirement**: {report.retirement_warning}" in text
    assert f"| champion stops answering | 2027-10-14 (in 30 days; {FINE_TUNE} at azure) |" in text
    run = MlflowClient(uri).get_run(log_drift(report, config, registry, tmp_path / "artifacts"))
    assert run.data.metrics["retirement_days_left"] == 30 and run.data.tags["champion_retires_on"] == "2027-10-14"
    early = check_drift(config, StateLayout(home), registry, tmp_path / "work", today=date(2027, 1, 1))
    assert early.retirement_days_left == 286 and early.retirement_warning == ""  # months away: no warning


def test_the_evaluation_artifact_has_a_line_for_an_api_champion_and_candidate():
    from tuneloop.core.records import ApiModel, Champion, EvalReport, ModelScore
    from tuneloop.tasks.evaluate import api_retirements, comparison_markdown

    score = ModelScore(accuracy=0.8, n_examples=10, n_unparsed=0)
    report = EvalReport(n_examples=10, base=score, candidate=score, champion=score, champion_version="2",
                        predictions_path=Path("p.jsonl"))
    champion = Champion(version="2", backend="openai", fine_tuned_model=FINE_TUNE, base_model="gpt-4o-mini-2024-07-18")
    candidate = ApiModel(base_model="gpt-4.1-2025-04-14", fine_tuned_model="ft:gpt-4.1-2025-04-14:a::b",
                         dataset_version="d", steps=1, train_loss=None, train_seconds=1.0)
    config = RetirementConfig()
    text = comparison_markdown(report, api_retirements(candidate, champion, "openai", config), config, TODAY)
    assert f"- champion `{FINE_TUNE}` (openai) shuts down 2027-01-14, in 53 days" in text
    assert "- candidate `ft:gpt-4.1-2025-04-14:a::b` (openai) shuts down 2027-01-14, in 53 days; OpenAI takes no new " \
           "fine-tuning jobs from 2027-01-06 (in 45 days)" in text
    local = candidate.model_copy(update={"backend": "local", "fine_tuned_model": None, "base_model": "tiny"})
    assert "Retirement" not in comparison_markdown(report, api_retirements(local, None, "openai", config), config)
    assert "Retirement" not in comparison_markdown(report)  # as before when no retirement table is given


# ---- the migration event and its trigger ------------------------------------------------------------------


def drift_events(monkeypatch, config) -> tuple[object, list]:
    """Run the drift-monitor flow, recording the events it emits through Prefect's own asserting client."""
    from prefect.events.clients import AssertingEventsClient
    from prefect.events.worker import EventsWorker

    from tuneloop.flows.drift import drift_monitor

    worker = EventsWorker.instance(AssertingEventsClient)
    with monkeypatch.context() as patch:
        patch.setattr(EventsWorker, "instance", lambda *_: worker)
        report = drift_monitor(config)
        worker.drain()
    return report, [e for e in worker._client.events if e.event.startswith("tuneloop.")]


def test_the_drift_monitor_emits_migration_due_within_migrate_days_only(prefect_harness, home, tmp_path, monkeypatch):
    uri = api_champion_registry(tmp_path)
    retires = date.today() + timedelta(days=10)
    sets = [f"register.tracking_uri={uri}", f"retirement.openai={{gpt-4o-mini-2024-07-18: {retires.isoformat()}}}"]

    report, events = drift_events(monkeypatch, load_config(DEMO_CONFIG, sets))
    assert report.retirement_days_left == 10 and not report.drifted
    assert [e.event for e in events] == ["tuneloop.migration.due"]
    event = events[0]
    assert event.resource.id == f"tuneloop.model.{MODEL}"
    assert event.payload["date"] == retires.isoformat() and event.payload["days_left"] == 10
    assert event.payload["champion_version"] == "2"
    assert event.payload["summary"] == f"champion v2 ({FINE_TUNE} at openai) stops answering {retires} (in 10 days)"

    report, events = drift_events(monkeypatch, load_config(DEMO_CONFIG, [*sets, "retirement.migrate_days=5"]))
    assert report.retirement_days_left == 10 and report.retirement_warning  # still warned about
    assert events == []  # but not migrated yet: 10 days > migrate_days


def test_serve_starts_a_migrating_retrain_on_the_event_and_prefect_yaml_agrees():
    from tuneloop.app.serve import retrain_triggers

    config = load_config(DEMO_CONFIG)
    params = {"config": str(DEMO_CONFIG), "overrides": []}
    triggers = {t.name: t for t in retrain_triggers(config, params)}
    migrate = triggers["migrate before the champion retires"]
    assert migrate.expect == {"tuneloop.migration.due"}
    assert dict(migrate.match.root) == {"prefect.resource.id": f"tuneloop.model.{MODEL}"}
    assert migrate.parameters["migrate"] is True and migrate.parameters["config"] == str(DEMO_CONFIG)
    assert migrate.parameters["reason"]["template"] == "migration due: {{ event.payload.summary }}"
    assert "migrate" not in triggers["retrain on drift"].parameters  # only this trigger migrates
    spec = yaml.safe_load((ROOT / "deployments" / "prefect.yaml").read_text())
    retrain = next(d for d in spec["deployments"] if d["name"] == "retrain")
    declared = next(t for t in retrain["triggers"] if t["name"] == migrate.name)
    assert declared["parameters"]["migrate"] is True and declared["expect"] == ["tuneloop.migration.due"]
