"""The API key of an OpenAI-style endpoint: a Prefect Secret block named in the config, else the environment.

Here, not in core: the Secret block is Prefect's, and the served champion loads core without Prefect
(``core.openai_client.env_api_key`` is its environment-only half). Training, evaluation, the judge and
drift monitoring all ask this one function, so a key reaches every caller the same way and is registered
with ``core.scrub`` before any of them logs.
"""

from __future__ import annotations

from tuneloop.core.config import ApiClientConfig
from tuneloop.core.openai_client import env_api_key
from tuneloop.core.records import TuneloopError
from tuneloop.core.scrub import register


def api_key(cfg: ApiClientConfig) -> str:
    """The Prefect Secret block named in the config, else the environment variable."""
    if cfg.api_key_secret_block:
        from prefect.blocks.system import Secret

        try:
            key = Secret.load(cfg.api_key_secret_block).get()
        except ValueError:
            raise TuneloopError(f"train.openai.api_key_secret_block: no Prefect Secret block named "
                                f"{cfg.api_key_secret_block!r}") from None
        register(key)
        return key
    return env_api_key(cfg)
