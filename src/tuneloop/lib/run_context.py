"""The run context: what one pipeline run hands its stages besides the config section they use.

The state folder's layout, this run's folder and id, the registry (built once, at the tracking URI the
config and environment name) and MLflow's artifact folder (the rule for which is ``StateLayout``'s). The
retrain and drift flows each build one, so no stage is handed a loose ``home``, ``tracking_uri`` or
``artifacts_dir``.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from tuneloop.core.config import PipelineConfig
from tuneloop.core.state import StateLayout
from tuneloop.lib.registry import ModelRegistry


@dataclass(frozen=True)
class RunContext:
    state: StateLayout
    run_dir: Path
    run_id: str
    registry: ModelRegistry
    started: datetime | None = None  # when the pipeline run started: its MLflow run spans it
    experiment: str = "tuneloop"  # the MLflow experiment of its runs (register.experiment)
    config_hash: str = ""  # the whole config's hash: an API training job is keyed by it

    @classmethod
    def open(cls, state: StateLayout, config: PipelineConfig, run_dir: Path, run_id: str,
             started: datetime | None = None) -> RunContext:
        uri = state.resolve_tracking_uri(config.registry.tracking_uri)
        return cls(state=state, run_dir=run_dir, run_id=run_id, registry=ModelRegistry(uri, config.registry.model_name),
                   started=started, experiment=config.registry.experiment, config_hash=config.config_hash())

    @property
    def tracking_uri(self) -> str:
        return self.registry.tracking_uri

    @property
    def artifacts_dir(self) -> Path | None:
        return self.state.artifacts_dir(self.tracking_uri)

    def __repr__(self) -> str:  # the registry's repr: never the tracking URI, which may carry a password
        return f"RunContext(run_id={self.run_id!r}, run_dir={str(self.run_dir)!r}, registry={self.registry!r})"
