"""PipelineConfig: the one typed configuration that flows through every stage.

Loaded from YAML in ``deployments/``; unknown keys and wrong types are refused with the file and the
dotted key. Relative paths in a config file are relative to that file's folder (as in docker-compose),
so a config works from any working directory. ``--set a.b=value`` overrides apply on top.

The source section lives in ``core.config_source``, the training sections in ``core.config_train`` and the shared building blocks (``Strict``, paths,
secret URLs) in ``core.config_base``; both are re-exported here, so every section imports from this module.
"""

from __future__ import annotations

import hashlib
import os
from datetime import date
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    Field,
    ValidationError,
    model_validator,
)

from tuneloop.core.config_base import ConfigPath, EnvVarName, SecretUrl, Strict, packaged
from tuneloop.core.config_source import (  # noqa: F401 - re-exported
    FolderSource,
    SourceConfig,
    SqlSource,
    driver_hint,
    file_digest,
)
from tuneloop.core.config_train import (  # noqa: F401 - re-exported: every section is importable from here
    ApiClientConfig,
    AzureDeploymentsConfig,
    LocalTrainConfig,
    LoraSettings,
    OpenAIModelSpec,
    OpenAITrainConfig,
    TinyBaseConfig,
    TrainConfig,
    azure_deployment_name,
)
from tuneloop.core.records import TuneloopError
from tuneloop.core.scrub import install_log_scrubber, register, url_secrets

DEFAULT_CONFIG = packaged("deployments", "demo.yaml")


class MappingConfig(Strict):
    """How a raw record becomes a chat example: templates over the record's fields, or a column that
    already holds the chat ``messages`` (a list of {role, content} objects, or that list as JSON text)."""

    system: str | None = None
    user: str | None = "{text}"
    assistant: str | None = "{answer}"
    messages: str | None = Field(None, description="column holding chat messages; replaces the templates")
    label: str | None = Field(None, description="field holding the class label, for classification tasks")
    id: str = Field("id", description="field that identifies a record in its source")
    metadata: list[str] = Field(default_factory=list, description="columns kept with each example for lineage")

    @model_validator(mode="after")
    def _templates_or_messages(self):
        if self.messages is None and not (self.user and self.assistant):
            raise ValueError("set mapping.user and mapping.assistant templates, or mapping.messages")
        return self


class QualityConfig(Strict):
    suite: ConfigPath = Field(default_factory=lambda: packaged("expectations", "raw_records.json"))
    chat_suite: ConfigPath = Field(default_factory=lambda: packaged("expectations", "chat_examples.json"))
    max_quarantine_fraction: float = Field(0.05, ge=0, le=1)
    min_examples: int = Field(10, ge=1, description="OpenAI requires at least 10")
    pii: Literal["redact", "quarantine"] = "redact"
    pii_patterns: dict[str, str] = Field(
        default_factory=dict, description="extra PII: NAME -> RE2 regex; redacted as [NAME]")
    phone_region: str = Field(
        "US", min_length=2, max_length=2, description="how national phone numbers are written in your data (ISO "
        "3166 code: US, GB, DE...); numbers written with + and a country code are found whatever it says")
    data_docs: bool = Field(True, description="build Great Expectations Data Docs in the run folder")
    prepare_in_subprocess: Literal["auto", "always", "never"] = Field(
        "auto", description="read and prepare chunks in a second process while GX validates (large batches)")


class ExportConfig(Strict):
    validation_fraction: float = Field(0.1, gt=0, lt=0.5)
    min_validation: int = Field(
        50, ge=1, description="the validation split holds at least this many examples where the data allows (about "
        "a quarter of them at most; a label's last example always trains): the validation loss of a handful of "
        "examples is noise, and early stopping and "
        "the best-checkpoint choice would follow it")
    seed: int = 0
    too_long: Literal["trim_prompt", "quarantine"] = Field(
        "trim_prompt", description="an example over the training token limit: trim_prompt cuts the middle of its "
        "user message(s), keeping the system message, the start and end of the prompt and the whole answer; "
        "quarantine sets it aside (too_long.jsonl in the export, reason too_many_tokens). An example whose system "
        "message and answer alone are over the limit is always set aside")
    max_heldout_overlap: float = Field(
        0.5, ge=0, le=1, description="the held-out set may remove at most this share of the dataset (examples asking "
        "a held-out question); more means it is (a copy of) the training data, an error before training. Half, as "
        "`tuneloop init --holdout` allows: its held-out records may all land in the landing folder too")


METRICS = Literal["accuracy", "macro_f1", "exact_match", "rouge_l", "bleu", "judge"]


class JudgeConfig(Strict):
    """LLM-as-judge through any OpenAI-compatible chat endpoint (off unless configured)."""

    model: str
    rubric: str = ("You grade a support answer against a reference answer. Score it from 1 (wrong or unhelpful) "
                   "to 5 (correct, complete, right tone). Reply with the number only.")
    base_url: SecretUrl | None = Field(None, description="unset: OpenAI (or $OPENAI_BASE_URL)")
    api_key_env: EnvVarName = "OPENAI_API_KEY"
    concurrency: int = Field(4, ge=1)


class EvaluateConfig(Strict):
    task: Literal["classification", "generation"] = Field(
        "classification", description="classification: a label parsed from the answer; generation: the text itself")
    holdout: ConfigPath
    golden: ConfigPath | None = Field(None, description="a hand-checked golden set in the held-out file's format")
    n_worst: int = Field(10, ge=0, description="wrong answers per model kept for error analysis")
    cache_generations: bool = Field(True, description="reuse a model's answers to the same prompts across runs")
    label_pattern: str = Field(r"^\s*(\S+)", description="regex whose first group is the predicted label")
    max_new_tokens: int | None = Field(
        None, ge=1, description="tokens each model may answer with. Unset: just enough for the longest held-out "
        "reference (classification: up to the end of its label). Set too short for a label, it is raised to fit "
        "(a cut-off label would be scored wrong), with a warning")
    batch_size: int = Field(64, ge=1)
    max_examples: int | None = Field(None, ge=1)
    few_shot: int = Field(
        4, ge=0, le=32, description="the prompted baseline: the base model asked with k solved examples from the "
        "training split (and, for classification, the label set) in its prompt; a candidate must beat it. "
        "0: not scored. Local backends only (through an API, every run would pay for it again)")
    collapse_share: float | None = Field(
        0.9, gt=0, le=1, description="classification: a candidate answering one label this often (and 25 points "
        "more often than the references hold it) has collapsed, and is not promoted; null: not checked")
    primary_metric: METRICS = Field(
        "accuracy", description="what a candidate must improve to become champion; one of the task's metrics "
        "(classification: accuracy, macro_f1; generation: exact_match, rouge_l, bleu, judge). Unset: accuracy for "
        "classification, rouge_l for generation")
    guards: dict[METRICS, float] = Field(
        default_factory=dict, description="metric -> largest allowed drop vs the champion, e.g. {macro_f1: 0.01}")
    judge: JudgeConfig | None = Field(None, description="an LLM grading free-text answers (generation only)")

    @staticmethod
    def task_metrics(task: str) -> tuple[str, ...]:
        """The metrics a task computes: labels for classification, the answer's text for generation. Exact match
        or BLEU of a label-sized answer, or accuracy of free text, would be numbers that mean nothing."""
        return ("accuracy", "macro_f1") if task == "classification" else ("exact_match", "rouge_l", "bleu", "judge")

    @model_validator(mode="before")
    @classmethod
    def _primary_metric_of_the_task(cls, data: Any) -> Any:
        """Unset, the primary metric is the task's own: accuracy for labels, ROUGE-L for free text."""
        if isinstance(data, dict) and data.get("primary_metric") is None:
            return {**data, "primary_metric": "rouge_l" if data.get("task") == "generation" else "accuracy"}
        return data

    @model_validator(mode="after")
    def _metrics_exist(self):
        computed = self.task_metrics(self.task)
        for key, names in (("primary_metric", [self.primary_metric]), ("guards", sorted(self.guards))):
            outside = [m for m in names if m not in computed]
            if outside:
                hint = (f"{', '.join(outside)} {'needs' if len(outside) == 1 else 'need'} labels: use "
                        f"{'it' if len(outside) == 1 else 'them'} with evaluate.task: classification"
                        if self.task == "generation" else
                        "exact_match, rouge_l, bleu and judge score free text: use them with evaluate.task: generation")
                raise ValueError(f"evaluate.{key} names {', '.join(outside)}, which a {self.task} task does not "
                                 f"compute (it scores {', '.join(computed)}); {hint}")
        if self.judge is not None and self.task != "generation":
            raise ValueError("evaluate.judge grades free-text answers: use it with evaluate.task: generation")
        if "judge" in {self.primary_metric, *self.guards} and self.judge is None:
            raise ValueError("evaluate.primary_metric or evaluate.guards uses 'judge': configure evaluate.judge")
        return self


class DistillConfig(Strict):
    """The champion as teacher: it answers the collected records that come without an answer (or all of them),
    and its answers become training targets, marked ``answered_by`` in the snapshot. How a team moves off an
    API fine-tune: the API model writes the targets a local model then learns (``tuneloop run --migrate``)."""

    teacher: Literal["none", "champion"] = Field(
        "none", description="none: a record without its answer fields is quarantined (missing answer); champion: "
        "the current champion (any backend) answers it")
    answer: Literal["missing", "all"] = Field(
        "missing", description="missing: only records that lack an answer field (or whose messages end with the "
        "user); all: the teacher's answer replaces every record's own")
    max_new_tokens: int = Field(
        256, ge=1, description="the longest answer the teacher may write (also the output tokens the cost check "
        "counts for each record: an upper bound)")
    batch_size: int = Field(32, ge=1, description="answers kept (cached) after each batch: a stopped run resumes "
                            "from there without paying twice")


class RegisterConfig(Strict):
    model_name: str = "tuneloop-model"
    experiment: str = "tuneloop"
    tracking_uri: SecretUrl | None = Field(None, description="unset: sqlite under $TUNELOOP_HOME")
    min_improvement: float = Field(0.0, ge=0)
    promote_when: Literal["better", "at_least_as_good"] = Field(
        "better", description="better: a tie keeps the champion; at_least_as_good: a tie promotes the candidate "
        "(what a migration off an API champion asks: as good, and local). `tuneloop run --migrate` sets it")
    beat_prompted: bool = Field(
        True, description="a candidate must score better than the base model prompted with solved examples "
        "(evaluate.few_shot): fine-tuning that does not beat prompting is not better")
    beat_majority: bool = Field(
        True, description="classification: a candidate must score better than always answering the training "
        "split's most common label, and must not have collapsed onto one label (evaluate.collapse_share)")


class ScheduleConfig(Strict):
    """When deployed (tuneloop serve / prefect.yaml): how often to retrain and to check for drift."""

    retrain_cron: str | None = Field("0 3 * * 1", description="cron for scheduled retraining (default: Mondays 03:00)")
    drift_cron: str | None = Field("0 6 * * *", description="cron for the drift monitor (default: daily 06:00)")
    timezone: str = "UTC"
    retrain_interval_seconds: int | None = Field(
        None, ge=5, description="an interval instead of retrain_cron (demos and tests)")
    poll_seconds: float = Field(1.0, gt=0, description="tuneloop watch: how often the landing folder or table is checked")


class DriftConfig(Strict):
    """Drift monitor: the champion on recent labeled data, and recent inputs against its training data."""

    window: int = Field(
        500, ge=10, description="most recent labeled examples to score the champion on; their length and label "
        "distributions are compared with the champion's last `window` training examples")
    min_examples: int = Field(30, ge=1, description="fewer recent examples than this: no verdict, only a note")
    max_accuracy_drop: float = Field(
        0.05, ge=0, description="performance drift: primary metric this far below its value at promotion")
    psi_threshold: float = Field(0.2, gt=0, description="input drift: population stability index of lengths or labels")
    vocabulary_threshold: float = Field(
        0.25, gt=0, le=1, description="input drift: share of recent words never seen in the training data")


# When fine-tuned models stop answering, by the base model they were tuned from, as each provider announced it
# (OpenAI: https://platform.openai.com/docs/deprecations; Azure OpenAI's model retirement page:
# https://learn.microsoft.com/azure/ai-foundry/openai/concepts/model-retirements). Dates change: check them
# before relying on them, and override them in your config (a table given there replaces the default one).
_FINE_TUNABLE_BASES = ("gpt-4o-2024-08-06", "gpt-4o-mini-2024-07-18", "gpt-4.1-2025-04-14", "gpt-4.1-mini-2025-04-14")


class RetirementConfig(Strict):
    """Retirement dates as data: when an API-backed champion stops answering, so the loop warns, then migrates."""

    openai: dict[str, date] = Field(
        default_factory=lambda: dict.fromkeys(_FINE_TUNABLE_BASES, date(2027, 1, 14)),
        description="base model (or a prefix of model ids) -> the day OpenAI's fine-tunes of it stop answering")
    azure: dict[str, date] = Field(
        default_factory=lambda: dict.fromkeys(_FINE_TUNABLE_BASES, date(2027, 10, 14)),
        description="base model (or a prefix of model ids) -> the last day Azure OpenAI serves deployments of "
        "fine-tunes of it")
    openai_training_closes: date | None = Field(
        date(2027, 1, 6), description="OpenAI takes no new fine-tuning jobs from this day")
    warn_days: int = Field(90, ge=0, description="from this many days before a champion's retirement, warnings")
    migrate_days: int = Field(
        30, ge=0, description="from this many days before, the drift monitor emits tuneloop.migration.due (a "
        "migrating retrain); 0: never")


class PipelineConfig(Strict):
    name: str = "tuneloop"
    source: SourceConfig = Field(default_factory=FolderSource)
    mapping: MappingConfig = Field(default_factory=MappingConfig)
    quality: QualityConfig = Field(default_factory=QualityConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig
    # "register" would shadow pydantic's ABCMeta.register; the YAML key stays "register".
    registry: RegisterConfig = Field(default_factory=RegisterConfig, alias="register")
    distill: DistillConfig = Field(default_factory=DistillConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    drift: DriftConfig = Field(default_factory=DriftConfig)
    retirement: RetirementConfig = Field(default_factory=RetirementConfig)

    # Where and how a run goes, not what it makes: changing these does not call for a retrain.
    _NOT_MODEL_SETTINGS = {
        "train": {"max_cost_usd": True,
                  "local": {"placement": True, "deployment": True, "progress_every": True},
                  "openai": {"api_key_env": True, "api_key_secret_block": True, "poll_seconds": True,
                             "max_paused_seconds": True, "request_retries": True, "eval_concurrency": True,
                             "tiktoken_cache_dir": True, "tiktoken_file": True, "models": True,
                             "azure_deployments": True}},
        "export": {"max_heldout_overlap": True},  # a guard: it stops a run, it does not shape the model
        "evaluate": {"cache_generations": True, "batch_size": True, "n_worst": True,
                     "judge": {"api_key_env": True, "concurrency": True}},
    }

    @model_validator(mode="after")
    def _champion_deployment_named(self):
        """Unset, the champion's Azure deployment is named after the registered model: one per model."""
        azure = self.train.openai.azure_deployments
        if azure is not None and azure.champion_deployment is None:
            azure.champion_deployment = azure_deployment_name(f"{self.registry.model_name}-champion")
        return self

    def model_settings(self) -> dict[str, str]:
        """The settings that shape the model and its verdict (training, export, evaluation), as dotted keys."""
        exclude = {**self._NOT_MODEL_SETTINGS, "train": dict(self._NOT_MODEL_SETTINGS["train"])}
        unused = ("local", "tiny") if self.train.uses_api else ("openai",)  # the other backend's settings
        exclude["train"].update(dict.fromkeys(unused, True))
        if self.train.base_model != "tiny":
            exclude["train"]["tiny"] = True
        data = self.model_dump(mode="json", include={"train", "export", "evaluate"}, exclude=exclude)
        flat: dict[str, str] = {}

        def walk(node: Any, prefix: str) -> None:
            if isinstance(node, dict):
                for key, value in node.items():
                    walk(value, f"{prefix}{key}.")
            else:
                flat[prefix[:-1]] = str(node)

        walk(data, "")
        # files by their content, not their path: the same config on another machine is the same training,
        # and an edited held-out file, corpus or template is a different one
        files = {"evaluate.holdout": [self.evaluate.holdout], "evaluate.golden": [self.evaluate.golden],
                 "train.tiny.corpus": list(self.train.tiny.corpus),
                 "train.local.chat_template": [Path(self.train.local.chat_template)]
                 if (self.train.local.chat_template or "").endswith((".jinja", ".j2")) else []}
        for key, paths in files.items():
            if key in flat and any(paths):
                flat[key] = ",".join(file_digest(p) for p in paths if p is not None)
        return flat

    def url_secrets(self) -> list[str]:
        """The passwords and tokens the config's URLs carry, as written and as read from the environment."""
        judge = self.evaluate.judge
        urls = [getattr(self.source, "url", None), self.registry.tracking_uri, self.train.openai.base_url,
                self.train.openai.azure_endpoint, judge.base_url if judge else None,
                getattr(self.train.openai.azure_deployments, "management_endpoint", None)]
        return [s for u in urls if u for s in {*url_secrets(u), *url_secrets(os.path.expandvars(u))}]

    def settings_hash(self, settings: dict[str, str] | None = None) -> str:
        """The hash of ``model_settings()`` (pass them when already computed: files are read to make them)."""
        data = "\n".join(f"{k}={v}" for k, v in sorted((settings or self.model_settings()).items()))
        return hashlib.sha256(data.encode()).hexdigest()[:16]

    def config_hash(self) -> str:
        """What the trained model depends on (when and how drift is checked, or when a provider retires a
        model, does not change it)."""
        data = self.model_dump_json(by_alias=True, exclude={"schedule", "drift", "retirement"})
        return hashlib.sha256(data.encode()).hexdigest()[:16]


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        elif not isinstance(child, dict):
            raise TuneloopError(f"--set {key}: {part} is a value, not a section")
        node = child
    node[parts[-1]] = value


class _ConfigLoader(yaml.SafeLoader):
    """yaml.safe_load, except that an impossible date (2027-02-30, a retirement day) is a YAML error with its
    line, not a ValueError traceback from deep inside PyYAML."""

    def construct_yaml_timestamp(self, node):
        try:
            return super().construct_yaml_timestamp(node)
        except ValueError as exc:
            raise yaml.constructor.ConstructorError(None, None, f"{node.value!r} is not a date ({exc})",
                                                    node.start_mark) from None


_ConfigLoader.add_constructor("tag:yaml.org,2002:timestamp", _ConfigLoader.construct_yaml_timestamp)


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b.c=value`` with the value read as YAML, so numbers, booleans and lists keep their types."""
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key or any(not p for p in key.split(".")):
        raise TuneloopError(f"--set {item!r}: expected KEY=VALUE with a dotted key, e.g. train.local.max_steps=20")
    try:
        value = yaml.load(raw, Loader=_ConfigLoader) if raw.strip() else ""
    except yaml.constructor.ConstructorError as exc:
        raise TuneloopError(f"--set {key}: {exc.problem}") from None
    except yaml.YAMLError:
        value = raw
    return key, value


RENAMED = {  # keys of earlier releases, so an old config is told what to write instead
    "train.local.checkpoint_every": "train.local.eval_every (a checkpoint is saved at each evaluation)",
}


def _describe(err: ValidationError, origin: str, overrides: dict[str, Any]) -> str:
    lines = []
    for e in err.errors():
        dotted = ".".join(str(p) for p in e["loc"])
        # a key inside a --set value (--set 'retirement.openai={gpt-4o: soon}') is that --set's, not the file's
        key = next((k for k in overrides if dotted == k or dotted.startswith(f"{k}.")), None)
        where = f"--set {key}" if key else origin
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        if dotted in RENAMED:
            msg = f"renamed: use {RENAMED[dotted]}"
        lines.append(f"{where}: {dotted}: {msg}")
    return "invalid configuration\n  " + "\n  ".join(lines)


def load_config(path: Path | str | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Read, override, validate. Every failure is a TuneloopError naming the file and the key."""
    path = Path(path) if path else DEFAULT_CONFIG
    if not path.is_file():
        raise TuneloopError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_ConfigLoader) or {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise TuneloopError(f"{where}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(data, dict):
        raise TuneloopError(f"{path}: expected a mapping of sections at the top level")
    applied = dict(parse_override(o) for o in overrides or [])
    for key, value in applied.items():
        _set_dotted(data, key, value)
    install_log_scrubber()  # every process that reads a config: the CLI, a deployment's flow run, the watcher
    try:
        config = PipelineConfig.model_validate(data, context={"base_dir": path.resolve().parent})
    except ValidationError as exc:
        raise TuneloopError(_describe(exc, str(path), applied)) from None
    register(*config.url_secrets())
    return config
