"""The training sections of the configuration: the local LoRA backend, the OpenAI/Azure fine-tuning API,
and the API-client settings (``ApiClientConfig``) the judge, the teacher and the served champion share with it.

Re-exported by ``core.config``: ``from tuneloop.core.config import TrainConfig`` keeps working.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    AfterValidator,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from tuneloop.core.config_base import (
    ConfigPath,
    EnvVarName,
    SecretUrl,
    Strict,
    _not_a_key,
    relative_to_config,
)
from tuneloop.core.records import TuneloopError


class LoraSettings(Strict):
    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"



TINY_LEARNING_RATE = 2e-3  # a random model learns the format and the labels from scratch
PRETRAINED_LEARNING_RATE = 5e-4  # LoRA on a real instruct model; README "A real model" says what the sweep found


class LocalTrainConfig(Strict):
    epochs: float = Field(
        3.0, gt=0, description="passes over the training split: the budget grows with the data. Early stopping on "
        "the validation loss may end training sooner; the best checkpoint by validation loss is kept")
    max_steps: int | None = Field(
        None, ge=0, description="optimizer steps instead of epochs (an override); 0 saves the untrained adapter (= base)")
    batch_size: int = Field(16, ge=1)
    learning_rate: float | None = Field(
        None, gt=0, description="unset: by the base model, 2e-3 for the tiny random one (it starts from nothing), "
        "5e-4 for a pretrained one (README \"A real model\": the sweep so far)")
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
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="on a CPU, the frozen base weights' dtype (the LoRA weights and the optimizer stay fp32): "
        "auto is bf16 for a pretrained base model where the CPU has bf16 units (AVX512-BF16 or AMX, read from its "
        "flags), else fp32 (and fp32 for the tiny model, too small to gain); bf16 forces it. On CUDA, auto and "
        "bf16 train in bf16 mixed precision where the GPU supports it")
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
            return str(relative_to_config(Path(value), info))
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



class ApiClientConfig(Strict):
    """How to reach an OpenAI-style endpoint (OpenAI, Azure OpenAI, a compatible server): what training, the
    judge, the teacher and the served champion share. ``train.openai`` is one, with the training settings."""

    provider: Literal["openai", "azure", "compatible"] = "openai"
    base_url: SecretUrl | None = Field(None, description="compatible endpoints; unset: $OPENAI_BASE_URL or OpenAI's")
    api_key_env: EnvVarName = Field(
        "OPENAI_API_KEY", description="environment variable holding the key (never put the key here: it is refused)")
    api_key_secret_block: Annotated[str | None, AfterValidator(_not_a_key)] = Field(
        None, description="a Prefect Secret block holding the key, used when set")
    azure_endpoint: SecretUrl | None = Field(None, description="https://<resource>.openai.azure.com")
    azure_api_version: str = "2025-04-01-preview"
    request_retries: int = Field(5, ge=0, description="our own retries of 429/5xx/dropped connections, with backoff")
    eval_concurrency: int = Field(4, ge=1, description="parallel chat.completions calls when evaluating")


class OpenAITrainConfig(ApiClientConfig):
    """The fine-tuning API: OpenAI, Azure OpenAI, or any endpoint that speaks it."""

    model: str = "gpt-4o-mini-2024-07-18"
    suffix: str | None = Field(None, max_length=64)
    seed: int | None = 0
    batch_size: int | Literal["auto"] = "auto"
    learning_rate_multiplier: float | Literal["auto"] = "auto"
    poll_seconds: float = Field(15.0, gt=0, description="first poll interval; backs off to 8x while nothing changes")
    max_paused_seconds: float = Field(3600.0, ge=0, description="how long a paused job is waited on before failing")
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

    # The one place ``backend`` is read: every decision that depends on it (which trainer, how to count
    # tokens, whether to warm-start, which settings shape the model, whether a gpu worker is needed) asks these.
    @property
    def uses_api(self) -> bool:
        """Trained by the fine-tuning API of OpenAI, Azure OpenAI or a compatible endpoint (train.openai)."""
        return self.backend == "openai"

    @property
    def on_pool(self) -> bool:
        """Trained locally on a ``gpu`` work pool's worker (train.local.placement: pool)."""
        return not self.uses_api and self.local.placement == "pool"

    @property
    def learning_rate(self) -> float:
        """train.local.learning_rate, or the default for this kind of base model."""
        if self.local.learning_rate is not None:
            return self.local.learning_rate
        return TINY_LEARNING_RATE if self.base_model == "tiny" else PRETRAINED_LEARNING_RATE

    @property
    def warm_starts(self) -> bool:
        """A local adapter that continues the champion's (train.local.init_from: champion)."""
        return not self.uses_api and self.local.init_from == "champion"
