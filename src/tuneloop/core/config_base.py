"""The building blocks of the configuration's types: strict models, paths relative to the config file,
URLs whose password is never dumped, and environment-variable names that refuse a pasted key.

Shared by ``core.config`` (the pipeline's sections) and ``core.config_train`` (the training sections).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    PlainSerializer,
    ValidationInfo,
)

from tuneloop.core.scrub import redact_url, scrub


def packaged(package: str, name: str) -> Path:
    """A file shipped inside the installed package (``tuneloop.expectations``, ``tuneloop.deployments``)."""
    from importlib.resources import files

    return Path(str(files(f"tuneloop.{package}") / name))



def relative_to_config(path: Path, info: ValidationInfo) -> Path:
    base = (info.context or {}).get("base_dir")
    path = path.expanduser()
    if not path.is_absolute() and base is not None:
        path = Path(base) / path
    return Path(str(path)) if not path.is_absolute() else path.resolve()



ConfigPath = Annotated[Path, AfterValidator(relative_to_config)]



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
