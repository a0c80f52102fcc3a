"""PipelineConfig: the one typed configuration that flows through every stage.

Loaded from YAML in ``deployments/``; unknown keys and wrong types are refused with the file and the
dotted key. Relative paths in a config file are relative to that file's folder (as in docker-compose),
so a config works from any working directory. ``--set a.b=value`` overrides apply on top.
"""

from __future__ import annotations

import hashlib
import os
import re
from datetime import date
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    PlainSerializer,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tuneloop.core.records import TuneloopError
from tuneloop.core.scrub import install_log_scrubber, redact_url, register, scrub, url_secrets


def packaged(package: str, name: str) -> Path:
    """A file shipped inside the installed package (``tuneloop.expectations``, ``tuneloop.deployments``)."""
    from importlib.resources import files

    return Path(str(files(f"tuneloop.{package}") / name))


DEFAULT_CONFIG = packaged("deployments", "demo.yaml")


def _resolve(path: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    path = path.expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return Path(str(path)) if not path.is_absolute() else path.resolve()


ConfigPath = Annotated[Path, AfterValidator(_resolve)]

# A URL that may carry a password or token. The object keeps it whole (it connects); dumped to JSON -- what
# Prefect stores as a flow run's parameters, what config_hash and MLflow see -- the secret is *** (a ${VAR}
# reference is kept: it names the secret without holding it).
SecretUrl = Annotated[str, PlainSerializer(redact_url, return_type=str, when_used="json")]


def _environment_variable(value: str) -> str:
    """The name of an environment variable; a key pasted in its place is refused without being shown."""
    keyish = len(value) >= 20 and "_" not in value and re.search(r"\d", value) and re.search(r"[A-Za-z]", value)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value) or keyish or scrub(value) != value:
        raise ValueError("must name the environment variable that holds the API key (letters, digits and _, e.g. "
                         "OPENAI_API_KEY), not the key itself. The value given is not shown, in case it is a key: "
                         "put the key in an environment variable, name that variable here, and rotate the key if "
                         "this config was shared")
    return value


def _not_a_key(value: str | None) -> str | None:
    if value is not None and scrub(value) != value:
        raise ValueError("looks like an API key (not shown): name the Prefect Secret block that holds the key")
    return value


EnvVarName = Annotated[str, AfterValidator(_environment_variable)]


class Strict(BaseModel):
    # hide_input_in_errors: a ValidationError printed anywhere (Prefect validating a flow's parameters, a
    # traceback) names the key and the problem, never the value -- which may be a password or a pasted key.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True,
                              hide_input_in_errors=True)


class FolderSource(Strict):
    """Files dropped into a landing folder. ``landing`` unset means ``$TUNELOOP_HOME/landing``.

    A file is complete, and so collected, when its name does not end in .part/.tmp/.partial, it is not
    hidden, it was last modified at least ``min_age_seconds`` ago, and (if ``marker_suffix`` is set) a
    marker file ``<name><marker_suffix>`` exists beside it.
    """

    kind: Literal["folder"] = "folder"
    landing: ConfigPath | None = None
    patterns: list[str] = Field(default_factory=lambda: ["*.jsonl", "*.csv", "*.parquet"])
    min_age_seconds: float = Field(0.0, ge=0)
    marker_suffix: str | None = Field(None, description="e.g. '.done' or '_SUCCESS'-style markers")
    chunk_size: int = Field(50_000, ge=1)


def _lookback_amount(value: float | str) -> float:
    """A look-back as one number ('1h' -> 3600.0), so that it applies to time and numeric watermarks alike."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", text)
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            value = float(text)
        elif parts and "".join(n + u for n, u in parts) == text:
            value = sum(float(n) * units[u] for n, u in parts)
        else:
            raise ValueError(f"{value!r} is not a look-back: write a duration such as '1h', '30m', '2d', '1h30m' or a number")
    if value < 0:
        raise ValueError("a look-back cannot be negative (0 re-reads only rows at the watermark itself)")
    return float(value)


class SqlSource(Strict):
    """Rows of a table or query through SQLAlchemy, taken incrementally by a watermark column.

    Each run reads the rows past the stored watermark and, again, those within ``lookback`` of it: a row
    committed late with an older or equal watermark value is still collected. Rows read again whose id and
    content (every column but the watermark) were already consumed are skipped; a changed one is an update.
    """

    kind: Literal["sql"] = "sql"
    url: SecretUrl = Field(description="SQLAlchemy URL, e.g. sqlite:///data.db or postgresql+psycopg://user:${DB_PASSWORD}"
                           "@host/db (${VAR} is read from the environment when connecting; postgresql+psycopg needs "
                           "pip install 'tuneloop[postgres]')")
    table: str | None = None
    query: str | None = Field(None, description="a SELECT; wrapped as a subquery and filtered by watermark")
    watermark: str = "updated_at"
    lookback: Annotated[float | str, AfterValidator(_lookback_amount)] = Field(
        3600.0, description="how far behind the stored watermark each run reads again, for rows committed late "
        "with a watermark value equal to or older than the newest already seen; rows read again whose id and "
        "content were consumed are skipped, changed ones are collected as updates. A duration ('1h', '30m', '2d') "
        "or a number: seconds for date/time columns, the column's own units for numeric ones (a duration counts "
        "as seconds there: right for epoch seconds; a sequence id re-reads its last 3600 values by default). "
        "0 re-reads only the rows at the watermark itself. Default: 1h")
    chunk_size: int = Field(50_000, ge=1)

    @model_validator(mode="after")
    def _one_of_table_or_query(self):
        if (self.table is None) == (self.query is None):
            raise ValueError("set exactly one of source.table and source.query")
        return self

    def driver_problem(self) -> str | None:
        """Why this URL cannot connect from this Python (unknown dialect, driver not installed), before trying."""
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        shown = redact_url(self.url)
        try:
            make_url(os.path.expandvars(self.url)).get_dialect().import_dbapi()
        except ArgumentError as exc:  # NoSuchModuleError too: a dialect SQLAlchemy does not know
            return f"source.url {shown}: not a usable SQLAlchemy URL ({scrub(str(exc).splitlines()[0])})"
        except ImportError as exc:
            return (f"source.url {shown}: its database driver {exc.name or ''} is not installed"
                    f"{'' if exc.name else ' (' + scrub(str(exc).splitlines()[0]) + ')'}: {driver_hint(exc.name)}")
        return None

    def require_driver(self) -> None:
        """Raise the driver problem as one line (a TuneloopError), not an ImportError's traceback."""
        problem = self.driver_problem()
        if problem:
            raise TuneloopError(problem)


def driver_hint(module: str | None) -> str:
    """What to install for a missing database driver."""
    if module == "psycopg":
        return "pip install 'tuneloop[postgres]'"
    if module == "psycopg2":
        return "write the URL as postgresql+psycopg://... and pip install 'tuneloop[postgres]' (or pip install psycopg2-binary)"
    return f"install the package that provides the {module!r} module" if module else "install the dialect's driver"


def _file_digest(path: Path) -> str:
    """sha256 of a file's content (first 16 hex digits), or its name when it cannot be read."""
    from tuneloop.core.state import sha256_file

    try:
        return "sha256:" + sha256_file(path)[:16]
    except OSError:
        return f"missing:{path.name}"


def _source_kind(value: Any) -> str:
    return (value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)) or "folder"


SourceConfig = Annotated[
    Annotated[FolderSource, Tag("folder")] | Annotated[SqlSource, Tag("sql")], Discriminator(_source_kind)
]


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


class LoraSettings(Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"


class LocalTrainConfig(Strict):
    epochs: float = Field(
        3.0, gt=0, description="passes over the training split: the budget grows with the data. Early stopping on "
        "the validation loss may end training sooner; the best checkpoint by validation loss is kept")
    max_steps: int | None = Field(
        None, ge=0, description="optimizer steps instead of epochs (an override); 0 saves the untrained adapter (= base)")
    batch_size: int = Field(16, ge=1)
    learning_rate: float = Field(2e-3, gt=0)
    warmup_steps: int = Field(10, ge=0)
    max_length: int = Field(
        256, ge=16, description="tokens per training example (and packed row); longer examples are handled by "
        "export.too_long before training, never cut through the answer")
    packing: bool = Field(
        True, description="pack examples into rows of max_length without padding (best-fit decreasing); each "
        "example still attends only to itself. batch_size then counts packed rows, not examples")
    attn_implementation: str | None = Field(
        None, description="e.g. flash_attention_2 on a GPU with flash-attn installed; default: the model's own (sdpa)")
    chat_template: str | None = Field(
        None, description="the chat template training formats with, for a base model whose own template has no "
        "{% generation %} markers and no training variant in TRL: a .jinja file whose assistant turns (answer and "
        "end-of-turn token) are wrapped in {% generation %}...{% endgeneration %}, 'chatml', or the name of a "
        "training template TRL ships (llama3, qwen2_5, gemma3, phi3, ...). It is saved with the adapter, so "
        "evaluation and serving use it too. Unset: the base model's own template (or TRL's training variant of it)")
    seed: int = 0
    lora: LoraSettings = Field(default_factory=LoraSettings)
    init_from: Literal["base", "champion"] = Field(
        "base", description="base: a fresh adapter each retrain; champion: a warm start, the champion's adapter "
        "trained further on the whole new dataset (same base and LoRA shape, else fresh, with a log line why)")
    eval_every: int | None = Field(
        None, ge=1, description="compute the validation loss and checkpoint every N steps (a rerun resumes from the "
        "last checkpoint); unset: ten times over the run")
    early_stopping_patience: int | None = Field(
        3, ge=1, description="stop after this many evaluations without a lower validation loss; unset: never stop early")
    gradient_checkpointing: bool = False
    quantization: Literal["none", "4bit"] = Field("none", description="4bit: QLoRA through bitsandbytes (CUDA only)")
    devices: int = Field(1, ge=1, description="processes (GPUs) to train on; >1 launches torchrun, one per device")
    distributed: Literal["ddp", "fsdp"] = Field(
        "ddp", description="with devices > 1: ddp replicates the model; fsdp shards it, for bases too big for one GPU")
    placement: Literal["inline", "pool"] = Field(
        "inline", description="inline: train in the retrain flow's process; pool: run the train-local deployment "
        "on the work pool (work_pool) and wait for it")
    deployment: str = Field("train-local/train-local", description="the flow/deployment started when placement: pool")
    progress_every: int = Field(25, ge=1, description="log step, loss, tokens/s and ETA every N steps")

    @field_validator("chat_template")
    @classmethod
    def _chat_template_file(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A template file is relative to the config's folder, like every path in a config."""
        if value and value.endswith((".jinja", ".j2")):
            return str(_resolve(Path(value), info))
        return value


class TinyBaseConfig(Strict):
    """Settings of the tiny offline base model used when ``train.base_model`` is ``tiny``."""

    corpus: list[ConfigPath] = Field(default_factory=list)
    vocab_size: int = Field(1024, ge=300)
    hidden_size: int = Field(128, ge=16)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    max_position_embeddings: int = 512
    initializer_range: float = Field(0.1, gt=0, description="larger than Llama's 0.02: a tiny random model needs it")
    seed: int = 0


class OpenAIModelSpec(Strict):
    """What a fine-tunable OpenAI model costs and holds. Prices change: this is config, not code."""

    context_tokens: int = Field(ge=1, description="longest training example; longer ones are truncated")
    usd_per_1m_training_tokens: float = Field(ge=0)
    usd_per_1m_input_tokens: float | None = Field(
        None, ge=0, description="what a fine-tune of this model costs to ask (prompt tokens): prices the teacher's "
        "answers when it distills into a local model (distill.teacher: champion)")
    usd_per_1m_output_tokens: float | None = Field(None, ge=0, description="... and to answer (completion tokens)")


def _default_openai_models() -> dict[str, OpenAIModelSpec]:
    # OpenAI's published fine-tuning prices (USD per 1M training tokens) and training context lengths.
    # Check https://openai.com/api/pricing before relying on them; override or add models in your config.
    # The last two: what a fine-tuned model of that base costs to use, per 1M input and output tokens.
    table = {
        "gpt-4.1-2025-04-14": (65_536, 25.00, 3.00, 12.00),
        "gpt-4.1-mini-2025-04-14": (65_536, 5.00, 0.80, 3.20),
        "gpt-4.1-nano-2025-04-14": (65_536, 1.50, 0.20, 0.80),
        "gpt-4o-2024-08-06": (65_536, 25.00, 3.75, 15.00),
        "gpt-4o-mini-2024-07-18": (65_536, 3.00, 0.30, 1.20),
        "gpt-3.5-turbo-0125": (16_385, 8.00, 3.00, 6.00),
    }
    return {name: OpenAIModelSpec(context_tokens=c, usd_per_1m_training_tokens=p, usd_per_1m_input_tokens=i,
                                  usd_per_1m_output_tokens=o) for name, (c, p, i, o) in table.items()}


def azure_deployment_name(text: str) -> str:
    """``text`` as an Azure deployment name: letters, digits, ``-``, ``_`` and ``.`` only, starting and ending
    with a letter or digit, at most 64 characters (a longer one keeps a hash of the rest, so it stays unique)."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-_.")
    if len(name) > 64:
        name = name[:55].rstrip("-_.") + "-" + hashlib.sha256(text.encode()).hexdigest()[:8]
    return name or "tuneloop"


def _deployment_name(value: str | None) -> str | None:
    if value is not None and (azure_deployment_name(value) != value or len(value) < 2):
        raise ValueError(f"{value!r} is not an Azure deployment name (2-64 letters, digits, '-', '_' or '.', "
                         f"starting and ending with a letter or digit): e.g. {azure_deployment_name(value)!r}")
    return value


DeploymentName = Annotated[str, AfterValidator(_deployment_name)]


class AzureDeploymentsConfig(Strict):
    """Deployments on an Azure OpenAI (AI Services) account, made through Azure Resource Manager: there a
    fine-tuned model answers only once deployed. Each candidate is deployed to be evaluated (then deleted);
    the champion answers through one stable deployment that apps call and promotions re-point."""

    subscription_id: str = Field(min_length=1)
    resource_group: str = Field(min_length=1)
    account: str = Field(min_length=1, description="the Azure OpenAI / AI Services resource name")
    management_endpoint: SecretUrl = Field(
        "https://management.azure.com", description="Azure Resource Manager (another cloud's, or a test's); "
        "a private CA is trusted through $REQUESTS_CA_BUNDLE")
    management_api_version: str = Field("2025-09-01", description="the Microsoft.CognitiveServices API version")
    token_env: EnvVarName | None = Field(
        None, description="environment variable holding an ARM bearer token (az account get-access-token); "
        "unset: azure-identity's DefaultAzureCredential (environment, managed identity, az login)")
    candidate_sku: str = Field(
        "DeveloperTier", description="how a candidate is deployed for evaluation: the Developer tier is billed per "
        "token, not by the hour; where the service refuses it for the model, Standard, with a warning")
    champion_sku: str = Field("Standard", description="how the champion's deployment is deployed")
    capacity: int = Field(1, ge=1, description="deployment capacity (Standard: thousands of tokens per minute)")
    champion_deployment: DeploymentName | None = Field(
        None, description="the stable deployment apps call, re-pointed at each promotion, rollback or promote "
        "(never deleted); unset: '<register.model_name>-champion'")
    base_deployment: DeploymentName | None = Field(
        None, description="the deployment that answers as the base model; unset: train.openai.model")
    poll_seconds: float = Field(10.0, gt=0, description="how often a deployment's provisioning state is polled")
    max_wait_seconds: float = Field(1800.0, gt=0, description="how long a deployment may take to provision")


class OpenAITrainConfig(Strict):
    """The fine-tuning API: OpenAI, Azure OpenAI, or any endpoint that speaks it."""

    provider: Literal["openai", "azure", "compatible"] = "openai"
    base_url: SecretUrl | None = Field(None, description="compatible endpoints; unset: $OPENAI_BASE_URL or OpenAI's")
    api_key_env: EnvVarName = Field(
        "OPENAI_API_KEY", description="environment variable holding the key (never put the key here: it is refused)")
    api_key_secret_block: Annotated[str | None, AfterValidator(_not_a_key)] = Field(
        None, description="a Prefect Secret block holding the key, used when set")
    azure_endpoint: SecretUrl | None = Field(None, description="https://<resource>.openai.azure.com")
    azure_api_version: str = "2025-04-01-preview"
    model: str = "gpt-4o-mini-2024-07-18"
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = 0
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"
    poll_seconds: float = Field(15.0, gt=0, description="first poll interval; backs off to 8x while nothing changes")
    max_paused_seconds: float = Field(3600.0, ge=0, description="how long a paused job is waited on before failing")
    request_retries: int = Field(5, ge=0, description="our own retries of 429/5xx/dropped connections, with backoff")
    eval_concurrency: int = Field(4, ge=1, description="parallel chat.completions calls when evaluating")
    n_epochs: int | Literal["auto"] = Field(
        "auto", description="'auto' follows OpenAI's default: 3, raised/lowered to keep examples x epochs in 100..25,000")
    models: dict[str, OpenAIModelSpec] = Field(default_factory=_default_openai_models)
    tiktoken_cache_dir: ConfigPath | None = Field(
        None, description="where tiktoken's encoding files are cached; unset: $TIKTOKEN_CACHE_DIR or $TUNELOOP_HOME/tiktoken")
    tiktoken_file: ConfigPath | None = Field(
        None, description="a .tiktoken BPE file (as OpenAI publishes it) to use instead of the cache or a download")
    azure_deployments: AzureDeploymentsConfig | None = Field(
        None, description="provider azure: deploy candidates to evaluate them and keep the champion's deployment "
        "(Azure Resource Manager; pip install 'tuneloop[azure]'); unset: deployments are made by hand")

    @model_validator(mode="after")
    def _deployments_on_azure(self):
        if self.azure_deployments is not None and self.provider != "azure":
            raise ValueError("train.openai.azure_deployments needs train.openai.provider: azure")
        return self

    @staticmethod
    def base_of(model: str) -> str:
        """A fine-tuned model ``ft:BASE:org::id`` is priced, limited and tokenized like BASE."""
        return model.split(":")[1] if model.startswith("ft:") and model.count(":") >= 1 else model

    def spec(self, model: str | None = None) -> OpenAIModelSpec:
        name = model or self.model
        base = self.base_of(name)
        for candidate in (name, base):
            if candidate in self.models:
                return self.models[candidate]
        raise TuneloopError(f"train.openai.models has no entry for {name!r}: add its context_tokens and "
                            "usd_per_1m_training_tokens (known: " + ", ".join(sorted(self.models)) + ")")


class TrainConfig(Strict):
    backend: Literal["local", "openai"] = Field(
        "local", description="local: LoRA through TRL here; openai: the fine-tuning API (train.openai)")
    base_model: str = Field("tiny", description="'tiny' (built offline), a local folder or a hub id")
    max_cost_usd: float | None = Field(
        None, ge=0, description="refuse a paid training job whose estimated cost is higher, before uploading")
    tiny: TinyBaseConfig = Field(default_factory=TinyBaseConfig)
    local: LocalTrainConfig = Field(default_factory=LocalTrainConfig)
    openai: OpenAITrainConfig = Field(default_factory=OpenAITrainConfig)


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
        unused = ("openai",) if self.train.backend == "local" else ("local", "tiny")  # the other backend's settings
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
                flat[key] = ",".join(_file_digest(p) for p in paths if p is not None)
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
