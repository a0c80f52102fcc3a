"""Where a stage logs: the Prefect run's log (shown in the UI) inside a flow or task, a plain logger when a
stage is called on its own (tests, benchmarks, a torchrun rank)."""

from __future__ import annotations

import logging


def stage_logger():
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("tuneloop")
