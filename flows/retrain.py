"""The retrain flow: collect → quality → snapshot → export → train → evaluate → register.

It only composes stages; each stage is a plain function in ``tasks/`` behind a thin Prefect task.
The consumption ledger is committed right after the snapshot is written: a run that fails later has
still produced a dataset version, and the next run trains on it instead of re-reading the files. With
nothing new and the newest version already trained, the run ends early.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime

from prefect import flow, get_run_logger
from prefect.runtime import flow_run

from tuneloop.core.config import PipelineConfig, TrainConfig, load_config
from tuneloop.core.mapping import required_fields
from tuneloop.core.records import RetrainResult
from tuneloop.core.state import prepare_state, run_lock
from tuneloop.lib.heldout import read_evaluation_set, read_fitted_heldout
from tuneloop.lib.ledger import (
    Settings,
    commit_ledger,
    consume,
    load_ledger,
    mark_trained,
    plan_training_task,
)
from tuneloop.lib.run_context import RunContext
from tuneloop.lib.runlog import name_flow_run
from tuneloop.lib.tokens import enforce_budget
from tuneloop.tasks.collect import collect_task
from tuneloop.tasks.distill import distill_task, migration_config
from tuneloop.tasks.evaluate import evaluate_task
from tuneloop.tasks.export import export_task, token_plan_task
from tuneloop.tasks.preflight import ensure_ready
from tuneloop.tasks.quality import enforce_min_examples, enforce_quarantine_limit, quality_task
from tuneloop.tasks.register import complete_registration_task, find_champion_task, register_task
from tuneloop.tasks.snapshot import snapshot_task
from tuneloop.tasks.train_local import warm_start_task


def handed_on(state) -> tuple:
    """The training's result, and its run as the upstream edge of the tasks that take it.

    A subflow's result handed to a task as it is is recorded as a ``flow_run`` input, which Prefect's UI (3.8)
    cannot read: the run's Task runs tab then shows none. Its run in this flow is a task run, an edge the UI
    reads; and the edge stays when the result is copied (a warm start notes the champion it continued)."""
    return state.result(), [state]


def cancel_openai_jobs(flow, flow_run, state) -> None:
    """Cancelling the flow run cancels the fine-tuning job it started (it would otherwise go on, billed)."""
    config = flow_run.parameters.get("config")
    if isinstance(config, str):
        config = load_config(config, flow_run.parameters.get("overrides") or [])
    config = PipelineConfig.model_validate(config) if isinstance(config, dict) else config
    if config is None or not config.train.uses_api:
        return
    from tuneloop.tasks.train_openai import cancel_jobs_of_flow_run

    cancelled = cancel_jobs_of_flow_run(config.train.openai, str(flow_run.id))
    logging.getLogger("tuneloop").warning(
        f"flow run cancelled: cancelled OpenAI fine-tuning job(s) {', '.join(cancelled)}" if cancelled
        else "flow run cancelled: no unfinished OpenAI fine-tuning job to cancel")


def trainer_for(train: TrainConfig):
    """The backend that trains this run: the OpenAI API, a ``gpu`` work pool's worker, or this process. Each
    is called the same way (export, training config, run context, adapter to continue) and returns the
    ``TrainedModel`` of its kind."""
    if train.uses_api:
        from tuneloop.tasks.train_openai import train_openai_task

        return train_openai_task
    if train.on_pool:
        from tuneloop.tasks.train_pool import train_on_pool_task

        return train_on_pool_task
    from tuneloop.flows.train_local import train_inline

    return train_inline


def started_name() -> str:
    """The run's name until it knows its dataset version (a run that fails early keeps this one)."""
    return f"retrain-{datetime.now(UTC):%Y%m%d-%H%M%S}"


@flow(name="retrain", flow_run_name=started_name, on_cancellation=[cancel_openai_jobs])
def retrain(config: PipelineConfig | str, overrides: list[str] | None = None, reason: str | None = None,
            force: bool = False, migrate: bool = False) -> RetrainResult:
    """Retrain on everything new in the source, or when the settings that shape the model changed; promote
    the result only if it is better.

    ``config`` is the configuration or, for deployments, the path of its YAML file (with ``overrides``);
    ``reason`` says what started the run (a schedule, data landing, drift) and is only logged; ``force``
    trains on the newest dataset version even when it was trained on with these settings; ``migrate`` trains a
    local model with the champion as the teacher of unlabelled records and promotes it when at least as good
    (moving off an API fine-tune before it retires).
    """

    started = datetime.now(UTC)  # the MLflow run of the candidate spans the whole pipeline, from here
    state = prepare_state()
    run_id = flow_run.get_id() or "local"
    with run_lock(state.home, f"retrain flow run {run_id}"):  # one run per state folder at a time
        log = get_run_logger()
        if isinstance(config, str):
            config = load_config(config, overrides or [])
        if migrate:
            config = migration_config(config)
            log.info("migration: a local candidate, the champion as teacher, promoted when at least as good")
        ensure_ready(config)  # before any work: a config problem is one line, not a failure after training
        if reason:
            log.info(f"started by: {reason}")
        run_dir = state.runs / f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{run_id[:8]}"
        run_dir.mkdir(parents=True, exist_ok=True)
        ctx = RunContext.open(state, config, run_dir, run_id, started)

        heldout = read_evaluation_set(config.evaluate, config.mapping, config.quality)
        ledger = load_ledger(state.ledger)
        landing = getattr(config.source, "landing", None) or state.landing
        raw = collect_task(config.source, landing, required_fields(config.mapping, config.distill.teacher != "none"), ledger)
        checked, new = None, None
        if not raw.nothing_new:
            checked = quality_task(raw, config.source, config.mapping, config.quality, run_dir, config.distill)
            if checked.n_unlabelled:  # records without an answer: the champion answers them
                teacher = find_champion_task(ctx.registry, run_dir / "teacher")
                checked = distill_task(checked, teacher, config, state.home, run_dir)
                enforce_quarantine_limit(checked, config.quality)
            new = snapshot_task(checked, state.datasets, ledger.dataset_version)
            enforce_min_examples(new.n_examples, config.quality, "examples in the dataset")
            ledger = consume(ledger, raw, new, checked.unread_sources)
            commit_ledger(ledger, state.ledger)
        values = config.model_settings()
        settings = Settings(hash=config.settings_hash(values), values=values)
        decision = plan_training_task(ledger, new, state.datasets, ctx.registry, settings, force)
        log.info(decision.reason)
        newest = decision.dataset.version if decision.dataset else ledger.dataset_version
        name_flow_run(f"{'migrate' if migrate else 'retrain'}-{newest[:8]}" if decision.train
                      else f"up-to-date-{newest[:8]}" if newest else "nothing-to-train")
        if not decision.train:
            completed = None
            if decision.complete_version is not None:  # a run killed after registering: finish, don't train again
                completed = complete_registration_task(ctx.registry, decision.complete_version)
            if decision.mark_trained:
                commit_ledger(mark_trained(ledger, decision.dataset.version, settings.hash, settings.values), state.ledger)
            if not any(run_dir.iterdir()):  # nothing was checked or trained: no folder to keep
                run_dir.rmdir()
            return RetrainResult(status="nothing_new", message=decision.reason, model_version=completed,
                                 run_dir=run_dir if run_dir.exists() else None, dataset_version=newest)
        dataset = decision.dataset

        plan = token_plan_task(config.train, state.models, state.home)
        exported = export_task(dataset, config.export, heldout, state.home / "exports", plan, config.config_hash(),
                               config.quality.min_examples)
        enforce_budget(exported.estimate, config.train.max_cost_usd)
        if exported.heldout_path is not None:  # held to the training limit, by the same policy
            heldout = read_fitted_heldout(exported.heldout_path)
        init_adapter, warm_from = None, None
        if config.train.warm_starts:
            warm_from = find_champion_task(ctx.registry, run_dir / "warm-start")
            init_adapter = warm_start_task(warm_from, config.train, state.models)
        training = trainer_for(config.train)(exported, config.train, ctx, init_adapter, return_state=True)
        trained, upstream = handed_on(training)
        if init_adapter is not None:
            trained = trained.model_copy(update={"warm_start_from": warm_from.version})
        # Looked up after training: a champion promoted meanwhile (tuneloop promote) is the one to beat.
        champion = find_champion_task(ctx.registry, run_dir / "champion")
        report = evaluate_task(trained, champion, heldout, config.evaluate, run_dir, config.train.openai,
                               state.home / "generations" if config.evaluate.cache_generations else None,
                               retirement=config.retirement, train_path=exported.train_path, wait_for=upstream)
        version = register_task(ctx, config, checked, exported, trained, report, wait_for=upstream)
        commit_ledger(mark_trained(ledger, dataset.version, settings.hash, settings.values), state.ledger)
        counts = checked.model_dump(include={"n_read", "n_accepted", "n_quarantined", "n_duplicates"}) if checked else {}
        return RetrainResult(status="trained", dataset_version=dataset.version, report=report, model_version=version,
                             run_dir=run_dir, distilled=checked.distilled if checked else None, **counts)
