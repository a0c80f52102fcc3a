"""Lineage: what ties a registered model to its data, settings, code and training job.

MLflow keeps it as string tags on the run and the model version; this record is the one place that writes
them (``tags``) and reads them back (``from_tags``), so a tag's name and its meaning (a missing
``settings_hash`` is a version registered before it was recorded) are decided once. The tag names are the
ones every earlier tuneloop wrote: a registry filled by an older release reads the same.
"""

from __future__ import annotations

from collections.abc import Mapping

from pydantic import BaseModel, ConfigDict, Field


class Lineage(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True, frozen=True, protected_namespaces=())

    dataset_version: str | None = None
    settings_hash: str | None = None  # what a retrain compares: the settings that shape the model
    config_hash: str | None = None
    backend: str = "local"  # a version registered before the tag existed was a local adapter
    base_model: str = ""
    fine_tuned_model: str | None = None  # API models: the service's model id
    openai_job_id: str | None = None
    openai_provider: str | None = None
    model_digest: str | None = None  # the adapter's bytes, or the service's model id: one version per model
    training_run_id: str | None = None  # trained on a work pool: that run holds the training's logs
    warm_start_from: str | None = None  # the champion version whose adapter it continued
    prefect_flow_run_id: str | None = None
    prefect_flow_run_url: str | None = None
    git_commit: str | None = None
    tuneloop_version: str | None = None
    state: str | None = Field(None, alias="tuneloop.state")  # the state folder that made it (orphan-run repair)

    def tags(self) -> dict[str, str]:
        """As MLflow tags: the fields that are set, under the names tuneloop has always used."""
        return {k: v for k, v in self.model_dump(by_alias=True, exclude_none=True).items()}

    @classmethod
    def from_tags(cls, tags: Mapping[str, str | None]) -> Lineage:
        """From a run's or a version's tags (other tags, such as scores, are ignored)."""
        return cls.model_validate({k: v for k, v in tags.items() if v is not None})

    @property
    def is_api_model(self) -> bool:
        return self.backend == "openai"
