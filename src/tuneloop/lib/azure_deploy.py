"""Azure deployments: on Azure OpenAI a fine-tuned model answers only once it is deployed on the account, and
deployments are Azure Resource Manager resources (``Microsoft.CognitiveServices/accounts/deployments``), made
with an Entra ID bearer token for ARM, not the data plane's API key.

tuneloop keeps two kinds:

* a candidate is deployed as ``tuneloop-candidate-<job id>`` (one per candidate; a rerun reuses it) on
  ``candidate_sku`` -- the Developer tier, meant for evaluating fine-tunes -- to be scored, and deleted once
  the promotion decision is made. Deployments with that prefix that an earlier run left (killed before it
  registered) are deleted when the next evaluation starts: a forgotten deployment bills by the hour.
* the champion answers through ``champion_deployment``, the stable name apps call. A promotion, ``tuneloop
  promote`` or ``tuneloop rollback`` re-points it at another fine-tuned model; it is never deleted.

Every call goes through Microsoft's SDK (``pip install 'tuneloop[azure]'``); every failure is one line with
the token scrubbed. The token is read from ``token_env`` or, unset, from azure-identity's
``DefaultAzureCredential`` (environment, managed identity, ``az login``).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tuneloop.core.config import AzureDeploymentsConfig, OpenAITrainConfig, azure_deployment_name
from tuneloop.core.records import TuneloopError
from tuneloop.core.scrub import register, scrub
from tuneloop.lib.runlog import stage_logger

CANDIDATE_PREFIX = "tuneloop-candidate-"
FALLBACK_SKU = "Standard"
INSTALL = "pip install 'tuneloop[azure]'"
# what ARM answers when a deployment type is not offered for a model (or in a region): the SKU, not the request
_SKU_REFUSALS = ("InvalidResourceProperties", "InvalidSkuName", "SkuNotSupported", "DeploymentSkuNotSupported",
                 "InvalidDeploymentSku")


@dataclass(frozen=True)
class DeploymentState:
    """A deployment as ARM describes it: which model it serves, on which SKU, and how far provisioning is."""

    name: str
    model: str | None
    sku: str | None
    state: str | None  # provisioningState: Creating, Updating, Succeeded, Failed, Deleting, ...
    tags: dict[str, str]


class SkuRefused(TuneloopError):
    """The service does not offer this SKU for the model (or here): another SKU may still work."""


def deployments_of(openai: OpenAITrainConfig | None) -> AzureDeploymentsConfig | None:
    """The managed deployments' settings when the API is Azure OpenAI and tuneloop manages them, else None."""
    if openai is None or openai.provider != "azure":
        return None
    return openai.azure_deployments


def candidate_deployment(fine_tuned_model: str | None, job_id: str | None) -> str:
    """The candidate's deployment name: from its job id (the fine-tuned model's id when there is none)."""
    return azure_deployment_name(CANDIDATE_PREFIX + (job_id or fine_tuned_model or "unknown"))


def champion_deployment(cfg: AzureDeploymentsConfig) -> str:
    if not cfg.champion_deployment:  # set from register.model_name when a pipeline config is loaded
        raise TuneloopError("train.openai.azure_deployments.champion_deployment is unset: name the deployment "
                            "apps call for the champion")
    return cfg.champion_deployment


class EnvironmentToken:
    """An ARM bearer token from an environment variable, as azure-core's credential protocol asks for it.
    Registered as a secret the moment it is read: no later log line or error of this process shows it."""

    def __init__(self, variable: str):
        token = os.environ.get(variable)
        if not token:
            raise TuneloopError(f"train.openai.azure_deployments.token_env: the environment variable {variable} is "
                                "not set: put an Azure Resource Manager token in it (az account get-access-token "
                                "--resource https://management.azure.com), or unset token_env to sign in through "
                                "DefaultAzureCredential")
        register(token)
        self._token = token

    def get_token(self, *scopes: str, **kwargs: Any):
        from azure.core.credentials import AccessToken

        return AccessToken(self._token, int(time.time()) + 3600)

    def close(self) -> None:
        pass


class RegisteredCredential:
    """azure-identity's credential, each token it issues registered as a secret before azure-core uses it."""

    def __init__(self, inner):
        self.inner = inner

    def get_token(self, *scopes: str, **kwargs: Any):
        token = self.inner.get_token(*scopes, **kwargs)
        register(token.token)
        return token

    def close(self) -> None:
        self.inner.close()


def management_client(cfg: AzureDeploymentsConfig):
    """The SDK's client for the account's resource group, at ``management_endpoint`` (the token's audience)."""
    try:
        from azure.mgmt.cognitiveservices import CognitiveServicesManagementClient
    except ImportError:
        raise TuneloopError(f"train.openai.azure_deployments needs the Azure SDK: {INSTALL}") from None
    if cfg.token_env:
        credential = EnvironmentToken(cfg.token_env)
    else:
        try:
            from azure.identity import DefaultAzureCredential
        except ImportError:
            raise TuneloopError(f"train.openai.azure_deployments without token_env signs in through azure-identity: "
                                f"{INSTALL}") from None
        credential = RegisteredCredential(DefaultAzureCredential())
    endpoint = cfg.management_endpoint.rstrip("/")
    return CognitiveServicesManagementClient(
        credential, cfg.subscription_id, base_url=endpoint, credential_scopes=[f"{endpoint}/.default"],
        api_version=cfg.management_api_version, polling_interval=cfg.poll_seconds, retry_total=3)


def describe(exc: Exception) -> str:
    """One line from an SDK error: HTTP status, ARM error code and message, secrets scrubbed."""
    status = getattr(exc, "status_code", None)
    error = getattr(exc, "error", None)
    code = getattr(error, "code", None)
    message = getattr(error, "message", None) or getattr(exc, "message", None) or str(exc) or type(exc).__name__
    first = next((line.strip() for line in str(message).splitlines() if line.strip()), type(exc).__name__)
    head = " ".join(p for p in (f"HTTP {status}" if status else "", code or "") if p)
    return scrub(f"{head}: {first}" if head else first)


def _arm_error(cfg: AzureDeploymentsConfig, what: str, exc: Exception) -> TuneloopError:
    """One line saying what was tried, where, what came back and (for a refused sign-in) what to check."""
    from azure.core.exceptions import ClientAuthenticationError

    status = getattr(exc, "status_code", None)
    hint = ""
    if isinstance(exc, ClientAuthenticationError) or status in (401, 403):
        source = f"the token in ${cfg.token_env}" if cfg.token_env else "DefaultAzureCredential's sign-in"
        hint = (f": check {source}, and that it may write Microsoft.CognitiveServices/accounts/deployments "
                "there (Cognitive Services Contributor)")
    return TuneloopError(f"azure deployments: {what} on account {cfg.account} (resource group "
                         f"{cfg.resource_group}): {describe(exc)}{hint}")


def _arm(cfg: AzureDeploymentsConfig, what: str, fn: Callable[[], Any]) -> Any:
    """An SDK call whose failure is one TuneloopError line."""
    from azure.core.exceptions import AzureError

    try:
        return fn()
    except AzureError as exc:
        raise _arm_error(cfg, what, exc) from None


def _state(deployment) -> DeploymentState:
    props, sku = deployment.properties, deployment.sku
    model = props.model if props is not None else None
    return DeploymentState(name=deployment.name, model=model.name if model is not None else None,
                           sku=sku.name if sku is not None else None,
                           state=props.provisioning_state if props is not None else None, tags=dict(deployment.tags or {}))


def list_deployments(cfg: AzureDeploymentsConfig, client=None) -> list[DeploymentState]:
    client = client or management_client(cfg)
    found = _arm(cfg, "listing deployments",
                 lambda: list(client.deployments.list(cfg.resource_group, cfg.account)))
    return [_state(d) for d in found]


def get_deployment(cfg: AzureDeploymentsConfig, name: str, client=None) -> DeploymentState | None:
    """The deployment, or None when there is none by that name."""
    from azure.core.exceptions import ResourceNotFoundError

    client = client or management_client(cfg)

    def get():
        try:
            return client.deployments.get(cfg.resource_group, cfg.account, name)
        except ResourceNotFoundError:
            return None

    found = _arm(cfg, f"reading deployment {name}", get)
    return _state(found) if found is not None else None


def deploy(cfg: AzureDeploymentsConfig, name: str, model: str, sku: str, role: str, client=None) -> DeploymentState:
    """Create or update ``name`` to serve ``model`` on ``sku`` and wait until it is provisioned. Raises
    SkuRefused when the service does not offer the SKU for the model; a deployment that ends Failed (or takes
    longer than ``max_wait_seconds``) is one error line."""
    from azure.core.exceptions import AzureError, HttpResponseError
    from azure.mgmt.cognitiveservices.models import Deployment, DeploymentModel, DeploymentProperties, Sku

    client = client or management_client(cfg)
    body = Deployment(sku=Sku(name=sku, capacity=cfg.capacity), tags={"managed-by": "tuneloop", "tuneloop-role": role},
                      properties=DeploymentProperties(model=DeploymentModel(format="OpenAI", name=model, version="1")))
    what = f"deploying {model} as {name} ({sku})"
    try:
        poller = client.deployments.begin_create_or_update(cfg.resource_group, cfg.account, name, body)
    except HttpResponseError as exc:
        code = getattr(getattr(exc, "error", None), "code", None) or ""
        text = str(getattr(getattr(exc, "error", None), "message", None) or exc)
        if exc.status_code == 400 and (code in _SKU_REFUSALS or sku.lower() in text.lower()) and "sku" in \
                (code + text).lower():
            raise SkuRefused(f"azure deployments: {what} on account {cfg.account}: {describe(exc)}") from None
        raise _arm_error(cfg, what, exc) from None
    except AzureError as exc:
        raise _arm_error(cfg, what, exc) from None
    polled = None
    try:
        poller.result(timeout=cfg.max_wait_seconds)
    except AzureError as exc:  # the poll ended Failed or Canceled: the deployment's own state says which
        polled = exc
    if not poller.done():
        raise TuneloopError(f"azure deployments: {what} on account {cfg.account}: still provisioning after "
                            f"{cfg.max_wait_seconds:.0f}s (train.openai.azure_deployments.max_wait_seconds); "
                            "rerun to wait for it again (the deployment is reused, not made twice)")
    state = get_deployment(cfg, name, client)
    if state is None or state.state != "Succeeded" or state.model != model:
        ended = state.state if state is not None else "gone (deleted meanwhile)"
        detail = f" ({describe(polled)})" if polled is not None and getattr(polled, "error", None) else ""
        raise TuneloopError(f"azure deployments: {what} on account {cfg.account} ended in provisioningState "
                            f"{ended}{detail}: see the deployment in the Azure AI Foundry portal (quota, region, "
                            "model availability), fix the cause and rerun (the deployment is made again)")
    return state


def delete_deployment(cfg: AzureDeploymentsConfig, name: str, client=None) -> bool:
    """Delete ``name`` (False when there was none). The champion's and the base's deployments are refused."""
    from azure.core.exceptions import ResourceNotFoundError

    if name in (cfg.champion_deployment, cfg.base_deployment):
        raise TuneloopError(f"azure deployments: {name} is the champion's or the base's deployment: tuneloop never "
                            "deletes it")
    client = client or management_client(cfg)

    def delete() -> bool:
        try:
            client.deployments.begin_delete(cfg.resource_group, cfg.account, name).result(
                timeout=cfg.max_wait_seconds)
        except ResourceNotFoundError:
            return False
        return True

    return _arm(cfg, f"deleting deployment {name}", delete)


def clear_earlier_candidates(cfg: AzureDeploymentsConfig, keep: str | None = None, client=None) -> list[str]:
    """Delete the candidate deployments earlier runs left (the prefix; never the champion's, the base's or
    ``keep``): the names deleted."""
    client = client or management_client(cfg)
    spared = {keep, cfg.champion_deployment, cfg.base_deployment}
    left = [d.name for d in list_deployments(cfg, client) if d.name.startswith(CANDIDATE_PREFIX) and d.name not in spared]
    for name in left:
        delete_deployment(cfg, name, client)
    if left:
        stage_logger().info(f"azure: deleted {len(left)} candidate deployment(s) earlier runs left: {', '.join(left)}")
    return left


def deploy_candidate(cfg: AzureDeploymentsConfig, fine_tuned_model: str, job_id: str | None,
                     warn: Callable[[str], None] | None = None, client=None) -> str:
    """The candidate's deployment, made (or reused) on ``candidate_sku``, falling back to Standard with a
    warning where the service refuses that tier for the model: the name to call it by."""
    client = client or management_client(cfg)
    name = candidate_deployment(fine_tuned_model, job_id)
    current = get_deployment(cfg, name, client)
    if current is not None and current.model == fine_tuned_model and current.state == "Succeeded":
        return name
    try:
        deploy(cfg, name, fine_tuned_model, cfg.candidate_sku, "candidate", client)
    except SkuRefused as refused:
        if cfg.candidate_sku == FALLBACK_SKU:
            raise
        (warn or stage_logger().warning)(
            f"{refused}; deploying the candidate as {FALLBACK_SKU} instead (billed by the hour until it is deleted "
            "after the promotion decision)")
        deploy(cfg, name, fine_tuned_model, FALLBACK_SKU, "candidate", client)
    stage_logger().info(f"azure: candidate {fine_tuned_model} deployed as {name}")
    return name


def repoint_champion(cfg: AzureDeploymentsConfig, fine_tuned_model: str, client=None) -> DeploymentState:
    """Make the champion's deployment serve ``fine_tuned_model`` (created when missing; its SKU kept when it
    exists). Nothing is sent when it already does."""
    client = client or management_client(cfg)
    name = champion_deployment(cfg)
    current = get_deployment(cfg, name, client)
    if current is not None and current.model == fine_tuned_model and current.state == "Succeeded":
        return current
    state = deploy(cfg, name, fine_tuned_model, (current.sku if current is not None and current.sku else cfg.champion_sku),
                   "champion", client)
    stage_logger().info(f"azure: champion deployment {name} now serves {fine_tuned_model}"
                        + (f" (was {current.model})" if current is not None and current.model else ""))
    return state


def settle_candidate(cfg: AzureDeploymentsConfig, fine_tuned_model: str, job_id: str | None, promoted: bool,
                     client=None) -> None:
    """After the promotion decision: a promoted candidate takes over the champion's deployment; either way its
    own deployment goes."""
    client = client or management_client(cfg)
    if promoted:
        repoint_champion(cfg, fine_tuned_model, client)
    name = candidate_deployment(fine_tuned_model, job_id)
    if name != cfg.champion_deployment and delete_deployment(cfg, name, client):
        stage_logger().info(f"azure: deleted the candidate's deployment {name}")


def answering_deployment(openai: OpenAITrainConfig | None, role: str, model: str, job_id: str | None = None,
                         warn: Callable[[str], None] | None = None) -> str:
    """What to call ``model`` by through the API in ``role`` (base, champion or candidate): on Azure with
    managed deployments, a deployment, ready to answer (a candidate deployed, the champion's deployment pointing
    at the champion); elsewhere the model id itself."""
    cfg = deployments_of(openai)
    if cfg is None:
        return model
    if role == "base":
        return cfg.base_deployment or openai.model
    if role == "candidate":
        return deploy_candidate(cfg, model, job_id, warn)
    client = management_client(cfg)
    current = get_deployment(cfg, champion_deployment(cfg), client)
    if current is None or current.model != model or current.state != "Succeeded":
        (warn or stage_logger().warning)(
            f"azure: champion deployment {cfg.champion_deployment} "
            + ("does not exist" if current is None else f"serves {current.model} ({current.state})")
            + f", not the registry's champion {model}: re-pointing it")
        repoint_champion(cfg, model, client)
    return champion_deployment(cfg)
