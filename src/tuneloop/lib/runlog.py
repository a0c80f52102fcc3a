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


def name_flow_run(name: str) -> None:
    """Name the current flow run by what it did (the dataset version it trained on), not Prefect's random name;
    the UI's run list is then readable. Outside a flow run, or if the server refuses, the name stays."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    run_id = flow_run.get_id()
    if not run_id:
        return
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(run_id, name=name)
    except Exception as exc:  # noqa: BLE001 - a name is not worth failing a run for
        stage_logger().warning(f"could not name the flow run {name!r}: {exc}")
