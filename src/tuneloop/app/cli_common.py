"""What every ``tuneloop`` command module shares: the --config and --set options, the one-line failure, the
config and tracking URI of the registry commands, and who is running them (recorded on the versions)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tuneloop.core.records import TuneloopError

CONFIG_ENV = "TUNELOOP_CONFIG"



ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", envvar=CONFIG_ENV,
                 help=f"pipeline config (YAML); default: ${CONFIG_ENV}, else the packaged demo config "
                 "(deployments/demo.yaml). `tuneloop init` writes one for your own data", dir_okay=False),
]



SetOption = Annotated[
    list[str] | None,
    typer.Option("--set", help="override a config key, e.g. --set train.local.max_steps=20 (repeatable)"),
]



def fail(message: str, code: int) -> None:
    """One line on stderr, then exit. The message names paths, columns and values from the data: printed as
    it is, never read as rich markup."""
    from rich.console import Console
    from rich.text import Text

    Console(stderr=True).print(Text.assemble(("error:", "bold red"), " ", message), highlight=False,
                               soft_wrap=True)
    raise typer.Exit(code)



def registry_config(config: Path | None, set_: list[str] | None):
    """The config and its registry's tracking URI (exit 2 on a bad config)."""
    from tuneloop.core.state import prepare_state

    state = prepare_state()
    from tuneloop.core.config import load_config

    try:
        cfg = load_config(config, set_ or [])
    except TuneloopError as exc:
        fail(str(exc), 2)
    return cfg, state.resolve_tracking_uri(cfg.registry.tracking_uri)



def registry_of(config: Path | None, set_: list[str] | None):
    cfg, uri = registry_config(config, set_)
    return cfg.registry.model_name, uri



def who() -> str:
    import getpass

    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "unknown"
