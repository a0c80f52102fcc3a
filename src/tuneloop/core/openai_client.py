"""The OpenAI-style API client: made, called and described the same way by training, evaluation and the
served champion, which loads without Prefect (so the Prefect Secret block lookup stays in the stage).

Every call goes through ``call`` with the SDK's own retries off: it decides what is safe to repeat, and
the key (and anything that looks like one) is scrubbed from every message it writes.
"""

from __future__ import annotations

import logging
import os
import random
import time
from collections.abc import Callable
from typing import Any

from tuneloop.core.config import ApiClientConfig
from tuneloop.core.records import TuneloopError
from tuneloop.core.scrub import register, scrub


def env_api_key(cfg: ApiClientConfig) -> str:
    """The key from the environment variable ``cfg.api_key_env``."""
    key = os.environ.get(cfg.api_key_env)
    if not key:  # scrubbed: a key pasted as the variable's name (the config refuses one; a copy built without it)
        raise TuneloopError(scrub(f"train.openai: no API key: set the environment variable {cfg.api_key_env} "
                                  "(train.openai.api_key_env) or name a Prefect Secret block in "
                                  "train.openai.api_key_secret_block"))
    register(key)  # out of every later log line of this process, too
    return key


def make_client(cfg: ApiClientConfig, key: str | None = None):
    """SDK retries off: ``call`` decides what is safe to repeat. ``key`` None: read from the environment."""
    from openai import AzureOpenAI, OpenAI

    key = key or env_api_key(cfg)
    if cfg.provider == "azure":
        endpoint = cfg.azure_endpoint or os.environ.get("AZURE_OPENAI_ENDPOINT")
        if not endpoint:
            raise TuneloopError("train.openai.provider is azure: set train.openai.azure_endpoint "
                                "(https://<resource>.openai.azure.com) or AZURE_OPENAI_ENDPOINT")
        return AzureOpenAI(api_key=key, azure_endpoint=endpoint, api_version=cfg.azure_api_version, max_retries=0)
    base_url = cfg.base_url or os.environ.get("OPENAI_BASE_URL")
    if cfg.provider == "compatible" and not base_url:
        raise TuneloopError("train.openai.provider is compatible: set train.openai.base_url or OPENAI_BASE_URL")
    return OpenAI(api_key=key, base_url=base_url, max_retries=0)


class Secrets:
    """Removes the key (and anything that looks like one: see core.scrub) from text bound for logs, errors or
    MLflow."""

    def __init__(self, *keys: str):
        self.keys = [k for k in keys if k]

    def scrub(self, text: str) -> str:
        return scrub(text, *self.keys)


def _retry_after(exc) -> float | None:
    response = getattr(exc, "response", None)
    if response is None:
        return None
    for header, scale in (("retry-after-ms", 1000), ("retry-after", 1)):
        value = response.headers.get(header)
        if value:
            try:
                return float(value) / scale
            except ValueError:
                return None
    return None


def describe_error(exc, secrets: Secrets) -> str:
    """One readable line: HTTP status, error code, message and offending parameter, key scrubbed."""
    body = getattr(exc, "body", None)
    err = body.get("error", body) if isinstance(body, dict) else {}
    err = err if isinstance(err, dict) else {}
    status = getattr(exc, "status_code", None)
    parts = [f"HTTP {status}" if status else type(exc).__name__]
    if err.get("code"):
        parts.append(str(err["code"]))
    parts.append(str(err.get("message") or getattr(exc, "message", "") or exc))
    if err.get("param"):
        parts.append(f"(param {err['param']})")
    return secrets.scrub(" ".join(parts))


def call(fn: Callable[[], Any], what: str, cfg: ApiClientConfig, secrets: Secrets,
         sleep: Callable[[float], None] = time.sleep, before_retry: Callable[[], Any] | None = None,
         warn: Callable[[str], None] | None = None) -> Any:
    """One API call with our retries: 429 honours retry-after, 5xx and dropped connections back off,
    401/403 and other 4xx fail at once with a readable line. Each retry is announced through ``warn``
    (default: the ``tuneloop`` logger)."""
    import openai

    warn = warn or logging.getLogger("tuneloop").warning
    for attempt in range(cfg.request_retries + 1):
        try:
            return fn()
        except (openai.AuthenticationError, openai.PermissionDeniedError) as exc:
            raise TuneloopError(
                f"{what}: {describe_error(exc, secrets)}. Check the API key in {cfg.api_key_env} and that the "
                "organization or project may use fine-tuning (OpenAI has closed self-serve fine-tuning to new "
                "customers; Azure OpenAI or a compatible endpoint are alternatives)") from None
        except openai.RateLimitError as exc:
            wait, last = _retry_after(exc) or min(60.0, 2.0 ** attempt), exc
        except openai.APIStatusError as exc:
            if exc.status_code < 500 and exc.status_code not in (408, 409):
                raise TuneloopError(f"{what}: {describe_error(exc, secrets)}") from None
            wait, last = min(60.0, 2.0 ** attempt) * (0.5 + random.random() / 2), exc
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            wait, last = min(60.0, 2.0 ** attempt) * (0.5 + random.random() / 2), exc
        if attempt == cfg.request_retries:
            break
        warn(f"{what}: {describe_error(last, secrets)}; retrying in {wait:.1f}s")
        sleep(wait)
        if before_retry is not None:
            found = before_retry()
            if found is not None:
                return found
    raise TuneloopError(f"{what}: gave up after {cfg.request_retries + 1} tries: {describe_error(last, secrets)}")


def chat_completions(cfg: ApiClientConfig, model: str, prompts: list[list[dict]], max_tokens: int,
                     key: str | None = None, warn: Callable[[str], None] | None = None) -> list[str]:
    """Greedy answers of an API model, ``eval_concurrency`` requests at a time, each retried like training
    calls. ``key`` None: read from the environment."""
    from concurrent.futures import ThreadPoolExecutor

    key = key or env_api_key(cfg)
    client = make_client(cfg, key)
    secrets = Secrets(key)

    def one(messages: list[dict]) -> str:
        reply = call(lambda: client.chat.completions.create(model=model, messages=messages, temperature=0,
                                                            max_tokens=max_tokens),
                     f"chat.completions ({model})", cfg, secrets, warn=warn)
        return reply.choices[0].message.content or ""

    with ThreadPoolExecutor(cfg.eval_concurrency) as pool:
        return list(pool.map(one, prompts))
