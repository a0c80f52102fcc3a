"""The typed records that stages hand each other, and the error every stage raises for bad input.

Records are pydantic models so that Prefect can persist them and the UI can show them; anything large
(examples, files, adapters) travels as a path inside the run folder plus its hash, never inline.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, SerializerFunctionWrapHandler, model_serializer


class TuneloopError(Exception):
    """A problem the user can fix (bad config, bad input, a failed gate): shown as one line, no traceback."""


class QuarantineEntry(BaseModel):
    """A record (or a whole unreadable file, line 0) that did not pass, and every reason why."""

    source: str
    line: int
    reasons: list[str]
    record: Any


@dataclass
class RecordChunk:
    """Up to chunk_size records of one source, column-friendly: rows plus their lineage."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    lines: list[int] = field(default_factory=list)
    unreadable: list[QuarantineEntry] = field(default_factory=list)
    # each row as the JSON it was read from (JSONL sources), kept for a quarantine entry instead of
    # serializing every row again; empty for sources that are not JSON
    raw: list[bytes] = field(default_factory=list)

    def add(self, row: dict[str, Any], source: str, line: int, raw: bytes | None = None) -> None:
        self.rows.append(row)
        self.sources.append(source)
        self.lines.append(line)
        if raw is not None:
            self.raw.append(raw)

    def merge(self, other: RecordChunk) -> None:
        """Append another chunk's rows, each with its lineage, and its unreadable entries."""
        if len(self.raw) != len(self.rows) or len(other.raw) != len(other.rows):
            self.raw = []  # not all rows were read as JSON: every row is written again when quarantined
        else:
            self.raw += other.raw
        self.rows += other.rows
        self.sources += other.sources
        self.lines += other.lines
        self.unreadable += other.unreadable

    def fingerprint(self) -> str:
        """Which records the chunk holds (where each came from), to check that two readers cut the same chunk."""
        digest = hashlib.sha256(f"{len(self.rows)}|{len(self.unreadable)}".encode())
        for source, line in zip(self.sources, self.lines, strict=True):
            digest.update(f"{source}\x1f{line}\n".encode("utf-8", "surrogatepass"))
        for entry in self.unreadable:
            digest.update(f"!{entry.source}\x1f{entry.line}\n".encode("utf-8", "surrogatepass"))
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self.rows) + len(self.unreadable)


class LandingFile(BaseModel):
    """A complete, not yet consumed file of the landing folder, identified by its content."""

    path: str
    sha256: str
    size: int
    format: Literal["jsonl", "csv", "parquet"]


class SqlSlice(BaseModel):
    """The rows of a SQL source past the last watermark, up to the newest one seen at collect time, and
    those within the look-back before it that were not consumed yet (committed late, or updated).

    The digests (``consumed``, ``window``) cover one look-back's rows: what the ledger keeps, so bounded.
    """

    source_key: str
    url: str  # password hidden
    selectable: str
    watermark: str
    after: Any = None
    up_to: Any = None
    n_rows: int  # rows to read: past ``after``, plus those read again that were not consumed yet
    reread_from: Any = None  # rows from here up to ``after`` are read again (the look-back); None: none are
    consumed: list[str] = Field(default_factory=list)  # digests of id + content already consumed: skipped
    n_reread: int = 0  # rows within the look-back read again
    n_already_consumed: int = 0  # of those, skipped: same id and content as a row already consumed
    window: list[str] | None = None  # digests of the rows within the look-back of ``up_to``, for the ledger


class RawBatch(BaseModel):
    """What collect found to be new; the records themselves are streamed by the quality stage."""

    files: list[LandingFile] = Field(default_factory=list)
    sql: SqlSlice | None = None
    rejected: list[QuarantineEntry] = Field(default_factory=list)  # whole files that cannot be read
    skipped: list[str] = Field(default_factory=list)  # incomplete files, with why
    already_consumed: int = 0

    @property
    def nothing_new(self) -> bool:
        return not self.files and not self.rejected and (self.sql is None or self.sql.n_rows == 0)


class ChatExample(BaseModel):
    """One training example in OpenAI chat format, traceable to its source record."""

    messages: list[dict[str, Any]]
    label: str | None = None
    record_id: str
    source: str
    line: int
    content_hash: str
    metadata: dict[str, Any] = Field(default_factory=dict)
    # who wrote the assistant's answer when it was not the record: the teacher, e.g. "champion v3
    # (ft:gpt-4o-mini-2024-07-18:acme::abc)". Unset: the record's own (human-labelled) answer.
    answered_by: str | None = None


class DistillSummary(BaseModel):
    """What the teacher did for one batch: how many records it answered, how many of those answers were paid
    for in this run (the rest came from the cache), and what they were estimated to cost."""

    teacher: str  # "champion v3 (ft:...)"
    teacher_model: str  # the API model id, or the adapter's identity
    n_to_answer: int
    n_answered: int  # became training examples
    n_quarantined: int  # no usable answer (empty, or no label in it)
    n_called: int  # answers generated (API calls) in this run
    n_cached: int  # answers found in the cache, not paid for again
    estimated_cost_usd: float | None = None  # an upper bound (every answer at distill.max_new_tokens); None: local
    answers_path: Path  # the golden outputs: every prompt and the teacher's answer, kept with the run


class ExpectationOutcome(BaseModel):
    """One expectation of a suite over the run. Two of one type on one column (regexes on ``body``) are two."""

    suite: str
    # unique in its suite, stable across runs, metric-safe: ``expect_column_values_to_not_match_regex.body``, or
    # with the check's name where type and column repeat (``...body.pii-email``); see lib/gx.py expectation_keys
    key: str
    expectation: str
    column: str | None
    title: str | None = None  # what the suite says it checks (meta name, why or pii), for people
    success: bool
    unexpected_count: int


class CheckedBatch(BaseModel):
    """The quality gate's result: accepted examples (a JSONL file), and an account of everything else."""

    accepted_path: Path
    quarantine_path: Path
    duplicates_path: Path
    summary_path: Path
    data_docs: Path | None = None
    n_read: int
    n_accepted: int
    n_quarantined: int
    n_duplicates: int
    n_redacted: int
    expectations: list[ExpectationOutcome]
    # files the gate could not read to the end (vanished, locked): not consumed, so read again once readable
    unread_sources: list[str] = Field(default_factory=list)
    # records that passed the gate but lack their answer, waiting for the teacher (distill.teacher); the
    # distill stage turns each into an accepted example or a quarantine entry
    unlabelled_path: Path | None = None
    n_unlabelled: int = 0
    distilled: DistillSummary | None = None

    @property
    def quarantined_fraction(self) -> float:
        return self.n_quarantined / self.n_read if self.n_read else 0.0

    @property
    def reconciles(self) -> bool:
        """read = accepted + quarantined + duplicates (+ waiting for the teacher): no record lost."""
        return self.n_read == self.n_accepted + self.n_quarantined + self.n_duplicates + self.n_unlabelled


class DatasetVersion(BaseModel):
    """A deduplicated snapshot: the previous one plus what this run accepted; its content hash is its version."""

    version: str
    path: Path
    n_examples: int
    previous: str | None = None
    n_added: int = 0
    n_already_present: int = 0
    n_replaced: int = 0
    # accepted records whose mapped example equals another accepted one's (other id or raw fields, same
    # prompt and answer): one is kept. (merged record id, kept record id), the first MERGES_NAMED of them
    n_merged: int = 0
    merged: list[tuple[str, str]] = Field(default_factory=list)


class TokenStats(BaseModel):
    """Token counts of one split, counted with the tokenizer that will train on it."""

    n_examples: int
    total: int
    min: int
    p50: int
    p95: int
    max: int
    limit: int | None = None
    n_over_limit: int = 0
    counted_with: str


class CostEstimate(BaseModel):
    """Billed tokens = sum(min(limit, tokens per example)) x epochs; cost at the configured price."""

    model: str
    n_examples: int
    epochs: int
    epochs_setting: int | str
    tokens_per_epoch: int
    billed_tokens: int
    usd_per_1m_training_tokens: float
    estimated_cost_usd: float
    n_over_limit: int
    context_tokens: int


class ExportedDataset(BaseModel):
    """Chat JSONL files ready for a trainer, with the manifest that describes them.

    """

    dataset_version: str
    directory: Path
    train_path: Path
    validation_path: Path
    manifest_path: Path
    n_train: int
    n_validation: int
    sha256: dict[str, str]
    n_heldout_overlaps: int = 0
    n_prompt_trimmed: int = 0  # over the token limit: the middle of the prompt cut, the answer whole
    n_too_long: int = 0  # over the token limit and set aside (too_long.jsonl, reason too_many_tokens)
    n_too_long_no_room: int = 0  # of n_too_long: the system message and the answer alone are over the limit
    n_too_long_below_floor: int = 0  # of n_too_long: fitting would keep too little of the prompt
    # the held-out set held to the same limit and policy (heldout.jsonl: the prompts evaluation asks)
    heldout_path: Path | None = None
    n_heldout: int = 0
    n_heldout_trimmed: int = 0
    n_heldout_too_long: int = 0  # not evaluated: they could not be made to fit (heldout_too_long.jsonl)
    token_stats: dict[str, TokenStats] = Field(default_factory=dict)
    estimate: CostEstimate | None = None
    reused: bool = False


class Trained(BaseModel):
    """What every candidate says, whichever backend made it: from which base, on which data, how training went.

    A candidate is one of two kinds (``TrainedModel``): a LoRA adapter trained here (``LocalAdapter``) or a
    model an API trained (``ApiModel``). What only one kind has is a field of that kind; the other kind
    answers None for it (a class constant), so a reader asks the record, never its ``backend`` string.
    """

    # a run that diverged has NaN losses: written as NaN and read back as NaN, not as null (which fails to load)
    model_config = ConfigDict(ser_json_inf_nan="constants")

    base_model: str
    dataset_version: str
    steps: int
    train_loss: float | None  # at the last logged step: the loss the model ended with
    train_seconds: float
    loss_history: list[tuple[int, float]] = Field(default_factory=list)
    step_metrics: dict[str, list[tuple[int, float]]] = Field(default_factory=dict)  # e.g. valid_loss per step
    trained_tokens: int | None = None
    artifacts_dir: Path | None = None  # the training's own files (loss curve; an API job's record and metrics)

    is_api_model: ClassVar[bool] = False
    artifacts_name: ClassVar[str] = "training"  # the MLflow artifact folder of ``artifacts_dir``

    def how_trained(self, provider: str | None = None) -> str:
        raise NotImplementedError

    def figures(self) -> dict[str, float | None]:
        """How training went, as the ``train/`` metrics of its MLflow run (None: not measured)."""
        return {"seconds": self.train_seconds, "trained_tokens": self.trained_tokens}

    def lineage_fields(self, provider: str | None = None) -> dict[str, str | None]:
        """Lineage only this kind of model has (``core.lineage.Lineage`` field names)."""
        return {}


class LocalAdapter(Trained):
    """A LoRA adapter trained here (in-process, under torchrun, or on a ``gpu`` work pool's worker)."""

    backend: Literal["local"] = "local"
    adapter_path: Path | None = None  # None only in the record a pool's worker hands back: the adapter is in MLflow
    mean_train_loss: float | None = None  # the mean over the steps this run trained (transformers' training_loss)
    resumed_from_step: int = 0  # the checkpoint a rerun continued from
    tokens_per_second: float | None = None  # non-padding tokens trained on per second
    peak_memory_mb: float | None = None  # GPU peak allocation, or the process's peak RSS on CPU
    devices: int = 1  # processes (GPUs) it trained on
    training_run_id: str | None = None  # on a work pool: the MLflow run holding the adapter it trained
    warm_start_from: str | None = None  # the champion version whose adapter training continued from
    epochs: float | None = None  # passes over the training split actually made
    best_step: int | None = None  # the checkpoint kept (lowest validation loss)
    stopped_early: bool = False  # early stopping ended training before its budget

    fine_tuned_model: ClassVar[None] = None
    job_id: ClassVar[None] = None

    def how_trained(self, provider: str | None = None) -> str:
        return f"LoRA on `{self.base_model}`, {self.steps} steps"

    def figures(self) -> dict[str, float | None]:
        return {**super().figures(), "tokens_per_second": self.tokens_per_second,
                "peak_memory_mb": self.peak_memory_mb, "resumed_from_step": self.resumed_from_step}

    def lineage_fields(self, provider: str | None = None) -> dict[str, str | None]:
        return {"training_run_id": self.training_run_id or None, "warm_start_from": self.warm_start_from or None}


class ApiModel(Trained):
    """A model the fine-tuning API of OpenAI, Azure OpenAI or a compatible endpoint trained."""

    backend: Literal["openai"] = "openai"
    fine_tuned_model: str | None = None  # the model id the service created
    job_id: str | None = None

    adapter_path: ClassVar[None] = None
    mean_train_loss: ClassVar[None] = None
    warm_start_from: ClassVar[None] = None
    is_api_model: ClassVar[bool] = True
    artifacts_name: ClassVar[str] = "openai"  # the job record, step metrics CSV, checkpoints list

    def how_trained(self, provider: str | None = None) -> str:
        return f"the {provider} fine-tuning API from `{self.base_model}` (`{self.fine_tuned_model}`)"

    def figures(self) -> dict[str, float | None]:
        return {**super().figures(), "resumed_from_step": 0}  # a job is never resumed: as every release logged it

    def lineage_fields(self, provider: str | None = None) -> dict[str, str | None]:
        return {"fine_tuned_model": self.fine_tuned_model or "", "openai_job_id": self.job_id or "",
                "openai_provider": provider}


# A candidate, either kind; parsed from JSON by its ``backend`` (TypeAdapter(TrainedModel).validate_json).
TrainedModel = Annotated[LocalAdapter | ApiModel, Field(discriminator="backend")]


class Champion(BaseModel):
    """The currently promoted model, fetched from the registry so it can be evaluated again."""

    version: str
    backend: str = "local"
    adapter_path: Path | None = None
    fine_tuned_model: str | None = None
    base_model: str
    dataset_version: str | None = None

    @property
    def is_api_model(self) -> bool:
        """No adapter: the registry found it an API model (Lineage.is_api_model) and fetched its id only."""
        return self.adapter_path is None


METRIC_TITLES = {"accuracy": "accuracy", "macro_f1": "macro-F1", "exact_match": "exact match",
                 "rouge_l": "ROUGE-L", "bleu": "BLEU", "judge": "judge"}  # every metric, in the order shown


class ModelScore(BaseModel):
    """One model's scores on the held-out examples, in its task's metrics only: a metric left None was not
    computed (a label task has no meaningful BLEU, a free-text task no accuracy), so none is shown as 0.

    Classification: accuracy, macro-F1, per class (an unparsed answer counts as wrong). Generation: exact
    match, ROUGE-L, BLEU of the whole answer, and the judge's grade when one is configured.
    """

    n_examples: int
    accuracy: float | None = None
    n_unparsed: int | None = None  # classification: answers with no label the pattern could find
    macro_f1: float | None = None
    per_class: dict[str, dict[str, float]] = Field(default_factory=dict)  # precision, recall, f1, support
    exact_match: float | None = None  # the whole answer, whitespace and case normalized
    rouge_l: float | None = None  # mean ROUGE-L F-measure (rouge-score)
    bleu: float | None = None  # corpus BLEU / 100 (sacrebleu)
    judge: float | None = None  # mean LLM-judge grade scaled to 0..1, when configured

    @model_serializer(mode="wrap")
    def _task_fields_only(self, handler: SerializerFunctionWrapHandler) -> dict[str, Any]:
        """Written out (report.json, Prefect results), a score holds its task's fields only: no nulls for
        metrics its task does not compute, no empty per-class table."""
        return {k: v for k, v in handler(self).items() if v is not None and v != {}}

    @property
    def metrics(self) -> dict[str, float]:
        """The metrics computed for this score, in display order."""
        return {name: float(value) for name in METRIC_TITLES if (value := getattr(self, name)) is not None}

    def metric(self, name: str) -> float:
        value = getattr(self, name)
        if value is None:
            raise ValueError(f"metric {name} was not computed")
        return float(value)


class EvalReport(BaseModel):
    """The same held-out examples scored for the base model, the champion (if any) and the candidate."""

    task: Literal["classification", "generation"] = "classification"  # which metrics the scores hold
    n_examples: int
    base: ModelScore
    candidate: ModelScore
    champion: ModelScore | None = None
    champion_version: str | None = None
    predictions_path: Path
    worst: dict[str, list[dict[str, Any]]] = Field(default_factory=dict)  # per model: wrong labels / lowest ROUGE-L
    n_golden: int = 0  # of n_examples, how many came from evaluate.golden
    cached_answers: int = 0  # answers taken from the generation cache instead of generated again
    max_new_tokens: int = 8  # the answer budget every model had (evaluate.answer_budget)
    # classification: always answering the training split's most common label, the floor to clear
    majority: ModelScore | None = None
    # the base model asked with the label set and evaluate.few_shot solved training examples (lib/fewshot.py)
    prompted: ModelScore | None = None
    n_shots: int = 0  # the most any example was asked with
    n_shots_min: int | None = None  # the fewest (shots are dropped until a long prompt fits); unset: n_shots

    @property
    def shots(self) -> str:
        """``4-shot``, or ``2-4-shot`` when some prompts had room for fewer."""
        fewest = self.n_shots if self.n_shots_min is None else self.n_shots_min
        return f"{self.n_shots}-shot" if fewest == self.n_shots else f"{fewest}-{self.n_shots}-shot"

    majority_label: str | None = None
    collapse: str | None = None  # set when the candidate answers one label for nearly everything (why)


class PromotionDecision(BaseModel):
    """Whether the candidate became champion, and why; logged and returned so nobody has to guess."""

    promoted: bool
    reason: str
    baseline: Literal["base", "champion"]
    delta: float  # on the primary metric
    primary_metric: str = "accuracy"
    deltas: dict[str, float] = Field(default_factory=dict)  # every compared metric
    guard_failures: list[str] = Field(default_factory=list)


class ModelVersion(BaseModel):
    name: str
    version: str
    run_id: str
    aliases: list[str]
    decision: PromotionDecision
    tracking_uri: str


class RetrainResult(BaseModel):
    """What one retrain run produced, end to end: printed by the CLI and returned by the flow."""

    status: Literal["trained", "nothing_new"]
    message: str = ""
    n_read: int = 0
    n_accepted: int = 0
    n_quarantined: int = 0
    n_duplicates: int = 0
    dataset_version: str | None = None
    report: EvalReport | None = None
    model_version: ModelVersion | None = None
    distilled: DistillSummary | None = None  # what the teacher answered for this run's records
    run_dir: Path | None = None  # None when the run had nothing to check or train (no folder is left)
