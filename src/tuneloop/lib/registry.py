"""The model registry: one typed owner of everything tuneloop keeps in MLflow's model registry.

``ModelRegistry(tracking_uri, model_name)`` is built once per run (by the flow, the CLI or the scenario)
and handed to what needs it: the register stage, drift monitoring, the ledger's training plan, the work
pool's training run, serving. It knows the champion and the versions, creates a version, moves the
aliases (with the history a rollback needs), promotes and rolls back by hand, lists the versions as typed
records, and repairs what a killed run left (runs left RUNNING, a version whose aliases were never set).
Lineage tags are written and read through ``core.lineage.Lineage`` only.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from tuneloop.core.config import OpenAITrainConfig
from tuneloop.core.lineage import Lineage
from tuneloop.core.records import METRIC_TITLES, Champion, ModelVersion, PromotionDecision, TuneloopError

CHAMPION = "champion"
CHALLENGER = "challenger"  # the newest candidate, promoted or not
HISTORY_TAG = "tuneloop.champion_history"  # JSON list of the versions that were champion, oldest first
PROMOTED_EVENT = "tuneloop.model.promoted"  # a Prefect event; `tuneloop notify` hooks a webhook to it
EXPERIMENT_KIND = ("mlflow.experimentKind", "finetuning")  # the UI opens it on runs, not on GenAI traces
LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"  # where `make mlflow-ui` serves a local store
# How the training loss and its kin are named in MLflow: the curve's last point is the loss the model ended with.
LOSS_CURVES = {"train_loss": "loss/train", "eval_loss": "loss/eval", "valid_loss": "loss/valid",
               "best_eval_loss": "loss/best_eval"}


def score_metric(who: str, metric: str) -> str:
    """The MLflow metric of one model's held-out score (``eval/candidate_accuracy``); the drift monitor reads it."""
    return f"eval/{who}_{metric}"


def mlflow_client(tracking_uri: str, registry_uri: str | None = None):
    """An MLflow client of ``tracking_uri`` (the fluent API's URI set too: artifact downloads use it)."""
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri, registry_uri=registry_uri)


def experiment_id(client, name: str, artifacts_dir: Path | None) -> str:
    """The experiment's id, created on first use (with the artifact folder of a local store)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        # A local SQLite store would otherwise put artifacts under the current working directory.
        location = artifacts_dir.resolve().as_uri() if artifacts_dir else None
        return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    if EXPERIMENT_KIND[0] not in experiment.tags:  # made by an older tuneloop: the UI guessed GenAI
        client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
    return experiment.experiment_id


def state_id() -> str:
    """This state folder on this machine: runs left RUNNING by it were killed (a run holds its lock)."""
    import socket

    from tuneloop.core.state import tuneloop_home

    return f"{socket.gethostname()}:{tuneloop_home()}"


class Registered(BaseModel):
    """What the registry holds for a dataset version and settings: its newest model version, and whether the
    run that registered it finished (a kill leaves it RUNNING)."""

    version: str | None = None
    complete: bool = True


class VersionSummary(BaseModel):
    """One version as ``tuneloop models`` lists it: aliases, the scores of its task, lineage, who set it."""

    version: str
    aliases: list[str] = Field(default_factory=list)
    task: str | None = None
    scores: dict[str, str] = Field(default_factory=dict)  # metric -> the candidate's score, as registered
    lineage: Lineage = Lineage()
    promoted: str | None = None
    set_by: str | None = None
    created: int | None = None
    reason: str | None = None

    def row(self) -> dict[str, Any]:
        """The flat row of ``tuneloop models --json`` (a key per metric the version was registered with)."""
        lin = self.lineage
        return {"version": self.version, "aliases": self.aliases, "task": self.task, **self.scores,
                "dataset_version": lin.dataset_version, "backend": lin.backend if "backend" in lin.model_fields_set
                else None, "base_model": lin.base_model if "base_model" in lin.model_fields_set else None,
                "fine_tuned_model": lin.fine_tuned_model, "openai_provider": lin.openai_provider,
                "promoted": self.promoted, "set_by": self.set_by, "created": self.created, "reason": self.reason}


class ModelRegistry:
    """The registered model ``model_name`` at ``tracking_uri``; the MLflow client is made on first use."""

    def __init__(self, tracking_uri: str, model_name: str, registry_uri: str | None = None):
        self.tracking_uri = tracking_uri
        self.model_name = model_name
        self.registry_uri = registry_uri  # None: MLflow's default (the tracking URI, or $MLFLOW_REGISTRY_URI)
        self._client = None

    def __repr__(self) -> str:  # never the URI: a tracking server's may carry a password
        return f"ModelRegistry({self.model_name!r})"

    @property
    def client(self):
        if self._client is None:
            self._client = mlflow_client(self.tracking_uri, self.registry_uri)
        return self._client

    def experiment_id(self, name: str, artifacts_dir: Path | None) -> str:
        return experiment_id(self.client, name, artifacts_dir)

    # -- the champion -------------------------------------------------------------------------------------

    def champion_version(self):
        """The MLflow version the ``champion`` alias points at, or None before the first promotion."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version_by_alias(self.model_name, CHAMPION)
        except MlflowException:
            return None

    def champion_training(self) -> tuple[str | None, str | None]:
        """The dataset version and settings hash the current champion was trained with (None before the first
        promotion; a settings hash of None for a champion registered before it was recorded)."""
        version = self.champion_version()
        if version is None:
            return None, None
        lineage = Lineage.from_tags(version.tags)
        return lineage.dataset_version, lineage.settings_hash

    def download_champion(self, dst: Path) -> Champion | None:
        """The current champion's adapter, downloaded from the registry, or None before the first promotion."""
        import mlflow

        version = self.champion_version()
        if version is None:
            return None
        dst.mkdir(parents=True, exist_ok=True)
        local = mlflow.artifacts.download_artifacts(artifact_uri=version.source, dst_path=str(dst),
                                                    tracking_uri=self.tracking_uri)
        lineage = Lineage.from_tags(version.tags)
        root = Path(local)
        adapter = root / "artifacts" / "adapter" if (root / "MLmodel").exists() else root  # pyfunc, or a bare adapter
        return Champion(version=str(version.version), backend=lineage.backend,
                        adapter_path=None if lineage.is_api_model else adapter,
                        fine_tuned_model=lineage.fine_tuned_model or None, base_model=lineage.base_model,
                        dataset_version=lineage.dataset_version)

    def history(self) -> list[str]:
        raw = self.client.get_registered_model(self.model_name).tags.get(HISTORY_TAG)
        return json.loads(raw) if raw else []

    def move_champion(self, version: str, who: str, why: str) -> str | None:
        """Point ``champion`` at ``version``, remember the move (for rollback) and who made it and why."""
        client, name = self.client, self.model_name
        history = self.history()
        if not history and (current := self.champion_version()) is not None:
            history = [str(current.version)]  # a registry from before the history was kept: start it there
        previous = history[-1] if history else None
        client.set_registered_model_alias(name, CHAMPION, version)
        if previous != version:
            history.append(version)
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history))
        when = datetime.now(UTC).isoformat(timespec="seconds")
        for key, value in (("champion_set_by", who), ("champion_reason", why), ("champion_set_at", when),
                           ("previous_champion", previous or "")):
            client.set_model_version_tag(name, version, key, value)
        return previous

    def get_version(self, version: str):
        """The MLflow version, or an error that lists the versions there are."""
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_model_version(self.model_name, version)
        except MlflowException:
            known = [str(v.version) for v in self.client.search_model_versions(f"name='{self.model_name}'")]
            raise TuneloopError(f"model {self.model_name!r} has no version {version!r}"
                                + (f" (versions: {', '.join(sorted(known, key=int))})" if known
                                   else " (no versions yet)")) from None

    def promote(self, version: str, who: str, why: str, openai: OpenAITrainConfig | None = None) -> str | None:
        """``tuneloop promote``: make ``version`` champion by hand; returns the version it replaced. With
        ``openai`` (the config's train.openai) on Azure, the champion's deployment is re-pointed to it first."""
        repoint_to_version(openai, self.get_version(version))
        return self.move_champion(version, who, why)

    def rollback(self, who: str, why: str, openai: OpenAITrainConfig | None = None) -> tuple[str, str]:
        """``tuneloop rollback``: champion back to the version that was champion before; returns (from, to).
        With ``openai`` on Azure, the champion's deployment is re-pointed to it first."""
        client, name = self.client, self.model_name
        history = self.history()
        if len(history) < 2:
            raise TuneloopError(f"model {name!r} has no earlier champion to roll back to "
                                f"(champion history: {', '.join(history) or 'empty'})")
        current, previous = history[-1], history[-2]
        repoint_to_version(openai, self.get_version(previous))
        client.set_registered_model_alias(name, CHAMPION, previous)
        client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[:-1]))
        when = datetime.now(UTC).isoformat(timespec="seconds")
        for key, value in (("rolled_back_by", who), ("rolled_back_reason", why), ("rolled_back_at", when)):
            client.set_model_version_tag(name, current, key, value)
        for key, value in (("champion_set_by", who), ("champion_reason", f"rollback from v{current}: {why}"),
                           ("champion_set_at", when)):
            client.set_model_version_tag(name, previous, key, value)
        return current, previous

    # -- versions -----------------------------------------------------------------------------------------

    def versions(self) -> list[VersionSummary]:
        """``tuneloop models``: every version with its aliases, scores, data and how it came to be; a version has
        the scores of its task only (a key per metric it was registered with: ``accuracy``, ``rouge_l``, ...)."""
        from mlflow.exceptions import MlflowException

        try:
            aliases = self.client.get_registered_model(self.model_name).aliases  # SQLite's search carries none
        except MlflowException:
            raise TuneloopError(f"no registered model {self.model_name!r} at {self.tracking_uri} yet") from None
        by_version: dict[str, list[str]] = {}
        for alias, version in aliases.items():
            by_version.setdefault(str(version), []).append(alias)
        found = sorted(self.client.search_model_versions(f"name='{self.model_name}'"), key=lambda v: int(v.version))
        return [VersionSummary(version=str(v.version), aliases=sorted(by_version.get(str(v.version), [])),
                               task=v.tags.get("task"), lineage=Lineage.from_tags(v.tags),
                               scores={m: v.tags[f"candidate_{m}"] for m in METRIC_TITLES if f"candidate_{m}" in v.tags},
                               promoted=v.tags.get("promoted"), set_by=v.tags.get("champion_set_by"),
                               created=v.creation_timestamp, reason=v.tags.get("promotion_reason"))
                for v in found]

    def versions_of(self, dataset_version: str, settings_hash: str | None, digest: str | None = None) -> list:
        """Versions trained on ``dataset_version`` with these settings (and, given, this very model)."""
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.search_model_versions(
                f"name='{self.model_name}' and tags.dataset_version='{dataset_version}'")
        except MlflowException:
            return []
        lineages = [(v, Lineage.from_tags(v.tags)) for v in found]
        return [v for v, lin in lineages if (settings_hash is None or lin.settings_hash in (None, settings_hash))
                and (digest is None or lin.model_digest == digest)]

    def view(self, dataset_version: str, settings_hash: str) -> Registered:
        """The newest version for a dataset version and settings, and whether its run finished."""
        found = self.versions_of(dataset_version, settings_hash)
        if not found:
            return Registered()
        newest = max(found, key=lambda v: int(v.version))
        try:
            complete = self.client.get_run(newest.run_id).info.status != "RUNNING" if newest.run_id else True
        except Exception:  # noqa: BLE001 - the run was deleted: nothing left to finish
            complete = True
        return Registered(version=str(newest.version), complete=complete)

    def create_version(self, run_id: str, model_id: str, tags: dict[str, str], description: str,
                       promote: bool, why: str):
        """A new version (the registered model is created on first use) of the run's logged model;
        ``challenger`` moves to it, and ``champion`` too when ``promote``."""
        from mlflow.exceptions import MlflowException

        client, name = self.client, self.model_name
        try:
            client.create_registered_model(name, description="Managed by tuneloop.")
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
        version = client.create_model_version(
            name, source=f"models:/{model_id}",  # mlflow.pyfunc.load_model("models:/NAME@champion")
            run_id=run_id, model_id=model_id, tags=tags, description=description)
        self.link_model_to_version(version)
        client.set_registered_model_alias(name, CHALLENGER, version.version)
        if promote:
            self.move_champion(str(version.version), "tuneloop retrain", why)
        return version

    def link_model_to_version(self, version) -> None:
        """The logged model's page lists the versions made from it (what mlflow.register_model records); the
        SQLite registry keeps no model id on the version, its ``models:/<id>`` source names it."""
        source = version.source or ""
        if not source.startswith("models:/m-"):
            return  # a version of the run's artifacts (registered before logged models): nothing to link
        model_id = source.removeprefix("models:/").split("/")[0]
        linked = json.loads(self.client.get_logged_model(model_id).tags.get("mlflow.modelVersions") or "[]")
        if not any(str(v.get("version")) == str(version.version) and v.get("name") == self.model_name for v in linked):
            self.client.set_logged_model_tags(model_id, {"mlflow.modelVersions": json.dumps(
                [*linked, {"name": self.model_name, "version": version.version}])})

    # -- repairing what a killed run left -----------------------------------------------------------------

    def adopt(self, version, decision: PromotionDecision) -> None:
        """Finish what a killed run left of a registration: its run, its aliases."""
        client = self.client
        run = client.get_run(version.run_id) if version.run_id else None
        if run is not None and run.info.status == "RUNNING":  # killed after the version existed: all was logged
            client.set_terminated(version.run_id, "FINISHED")
        self.link_model_to_version(version)
        client.set_registered_model_alias(self.model_name, CHALLENGER, version.version)
        if decision.promoted:
            current = self.champion_version()
            if current is None or str(current.version) != str(version.version):
                self.move_champion(str(version.version), "tuneloop retrain", decision.reason)

    def close_orphan_runs(self, experiment: str, keep: str | None = None) -> list[str]:
        """Runs this state folder left RUNNING (killed, or a full disk): marked FAILED, so none stays 'running'
        forever in the UI. Only this state folder's: another machine's run may really be running."""
        from mlflow.entities import RunTag

        client = self.client
        orphans = client.search_runs(
            [experiment], f"attributes.status = 'RUNNING' and tags.`tuneloop.state` = '{state_id()}'",
            max_results=100)
        closed = []
        for run in orphans:
            if run.info.run_id == keep:
                continue
            client.log_batch(run.info.run_id, tags=[RunTag("tuneloop.ended", "the run was killed before it "
                                                           "finished; marked FAILED by the next run")])
            client.set_terminated(run.info.run_id, "FAILED")
            self._fail_pending_models(experiment, run.info.run_id)
            closed.append(run.info.run_id)
        return closed

    def _fail_pending_models(self, experiment: str, run_id: str) -> None:
        """A model a killed run was uploading stays PENDING in the Models tab forever: mark it FAILED."""
        from mlflow.entities import LoggedModelStatus

        for model in self.client.search_logged_models([experiment], filter_string=f"source_run_id = '{run_id}'"):
            if model.status == LoggedModelStatus.PENDING:
                self.client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)

    def complete(self, version: str) -> ModelVersion:
        """Finish a registration a killed run left: its run FINISHED, its aliases as its decision said; other
        runs it left RUNNING marked FAILED."""
        import tempfile

        client = self.client
        mv = client.get_model_version(self.model_name, version)
        try:  # the decision the killed run made, as it logged it before registering
            with tempfile.TemporaryDirectory() as tmp:
                path = client.download_artifacts(mv.run_id, "evaluation/promotion_decision.json", tmp)
                decision = PromotionDecision.model_validate_json(Path(path).read_bytes())
        except Exception:  # noqa: BLE001 - artifact gone: the version's tags say as much as is needed
            decision = PromotionDecision(promoted=mv.tags.get("promoted") == "True", baseline="base", delta=0.0,
                                         reason=mv.tags.get("promotion_reason", ""))
        self.close_orphan_runs(client.get_run(mv.run_id).info.experiment_id, keep=mv.run_id)
        self.adopt(mv, decision)
        return self.model_version(version, mv.run_id, decision)

    def model_version(self, version: str, run_id: str | None, decision: PromotionDecision) -> ModelVersion:
        """The record a registration returns: the aliases the decision gave it."""
        aliases = [CHAMPION, CHALLENGER] if decision.promoted else [CHALLENGER]
        return ModelVersion(name=self.model_name, version=version, run_id=run_id or "", aliases=aliases,
                            decision=decision, tracking_uri=self.tracking_uri)


def repoint_to_version(openai: OpenAITrainConfig | None, mv) -> str | None:
    """When ``mv`` is an Azure fine-tune and tuneloop manages the deployments: the champion's deployment
    serves it (before the alias moves, so a failure changes nothing). Returns the deployment, or None."""
    from tuneloop.lib.azure_deploy import deployments_of, repoint_champion

    azure = deployments_of(openai)
    lineage = Lineage.from_tags(mv.tags)
    if azure is None or not lineage.is_api_model or not lineage.fine_tuned_model:
        return None
    repoint_champion(azure, lineage.fine_tuned_model)
    return azure.champion_deployment


def mlflow_version_url(mv: ModelVersion) -> tuple[str, str]:
    """The model version's page in the MLflow UI (it links to the run), and how that UI is started."""
    from urllib.parse import quote

    remote = mv.tracking_uri.startswith(("http://", "https://"))
    base = mv.tracking_uri.rstrip("/") if remote else LOCAL_MLFLOW_UI
    how = "" if remote else " (with `make mlflow-ui` or `mlflow ui --backend-store-uri " + mv.tracking_uri + "`)"
    # the UI keeps GenAI or model-training mode per browser, GenAI by default: the link asks for model training
    return f"{base}/#/models/{quote(mv.name)}/versions/{mv.version}?workflowType=machine_learning", how
