"""The typed records that stages hand each other, and the error every stage raises for bad input.

Records are pydantic models so that Prefect can persist them and the UI can show them; anything large
(examples, files, adapters) travels as a path inside the run folder plus its hash, never inline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class TuneloopError(Exception):
    """A problem the user can fix (bad config, bad input, a failed gate): shown as one line, no traceback."""


class Record(BaseModel):
    """One raw record as read, with where it came from, so a quarantine entry can point back at it."""

    model_config = ConfigDict(frozen=True)

    source: str
    line: int
    fields: dict[str, Any]


class QuarantineEntry(BaseModel):
    """A record that did not pass, and every reason why."""

    source: str
    line: int
    reasons: list[str]
    record: dict[str, Any] | str


class RawBatch(BaseModel):
    """What collect read: parsed records, plus lines that could not be parsed (already rejected)."""

    files: list[str]
    records: list[Record]
    unreadable: list[QuarantineEntry] = Field(default_factory=list)

    @property
    def n_read(self) -> int:
        return len(self.records) + len(self.unreadable)


class ChatExample(BaseModel):
    """One training example in OpenAI chat format, traceable to its source record."""

    messages: list[dict[str, str]]
    label: str | None = None
    record_id: str
    source: str
    line: int
    content_hash: str


class ExpectationOutcome(BaseModel):
    expectation: str
    column: str | None
    success: bool
    unexpected_count: int


class CheckedBatch(BaseModel):
    """The quality gate's result: accepted examples, and an account of everything else."""

    accepted: list[ChatExample]
    quarantine_path: Path
    duplicates_path: Path
    n_read: int
    n_quarantined: int
    n_duplicates: int
    n_redacted: int
    expectations: list[ExpectationOutcome]

    @property
    def n_accepted(self) -> int:
        return len(self.accepted)

    @property
    def quarantined_fraction(self) -> float:
        return self.n_quarantined / self.n_read if self.n_read else 0.0


class DatasetVersion(BaseModel):
    """A deduplicated snapshot of accepted examples; its content hash is its version."""

    version: str
    path: Path
    n_examples: int


class ExportedDataset(BaseModel):
    """Chat JSONL files ready for a trainer, with the manifest that describes them."""

    dataset_version: str
    directory: Path
    train_path: Path
    validation_path: Path
    manifest_path: Path
    n_train: int
    n_validation: int
    sha256: dict[str, str]


class TrainedModel(BaseModel):
    """A candidate: which backend made it, from which base, on which data, and how training went."""

    backend: Literal["local"]
    base_model: str
    adapter_path: Path
    dataset_version: str
    steps: int
    train_loss: float | None
    loss_history: list[tuple[int, float]] = Field(default_factory=list)
    train_seconds: float


class Champion(BaseModel):
    """The currently promoted model, fetched from the registry so it can be evaluated again."""

    version: str
    adapter_path: Path
    base_model: str
    dataset_version: str | None = None


class ModelScore(BaseModel):
    accuracy: float
    n_examples: int
    n_unparsed: int


class EvalReport(BaseModel):
    """The same held-out examples scored for the base model, the champion (if any) and the candidate."""

    n_examples: int
    base: ModelScore
    candidate: ModelScore
    champion: ModelScore | None = None
    champion_version: str | None = None
    predictions_path: Path


class PromotionDecision(BaseModel):
    """Whether the candidate became champion, and why; logged and returned so nobody has to guess."""

    promoted: bool
    reason: str
    baseline: Literal["base", "champion"]
    delta: float


class ModelVersion(BaseModel):
    name: str
    version: str
    run_id: str
    aliases: list[str]
    decision: PromotionDecision
    tracking_uri: str


class RetrainResult(BaseModel):
    """What one retrain run produced, end to end: printed by the CLI and returned by the flow."""

    n_read: int
    n_accepted: int
    n_quarantined: int
    n_duplicates: int
    dataset_version: str
    report: EvalReport
    model_version: ModelVersion
    run_dir: Path
