"""The Great Expectations adapter: suites read from JSON, validated chunk by chunk through a checkpoint,
failing rows reported by a row-number column, Data Docs built once at the end of a run.

GX validates tables, not nested JSON: the gate hands it the mapped fields and the flattened chat columns.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tuneloop.core.records import TuneloopError

ROW = "_row"
UNIQUE = "expect_column_values_to_be_unique"


def load_suite(path: Path, without: str | None = None) -> tuple[Any, list[dict[str, Any]]]:
    """The suite, and the expectations of type ``without`` taken out of it (run-wide checks)."""
    import great_expectations as gx

    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        taken = [e for e in data.get("expectations", []) if e.get("type") == without]
        data["expectations"] = [e for e in data.get("expectations", []) if e.get("type") != without]
        return gx.ExpectationSuite(**data), taken
    except FileNotFoundError:
        raise TuneloopError(f"quality suite {path} does not exist") from None
    except (json.JSONDecodeError, TypeError, ValueError, KeyError, AttributeError) as exc:
        raise TuneloopError(f"quality suite {path} is not a valid expectation suite ({exc})") from None


class SuiteRunner:
    """One GX suite, validated chunk after chunk through a checkpoint."""

    def __init__(self, context, suite):
        import great_expectations as gx

        self.name = suite.name
        asset = context.data_sources.add_pandas(f"{suite.name}-source").add_dataframe_asset(suite.name)
        definition = asset.add_batch_definition_whole_dataframe("chunk")
        suite = context.suites.add(suite)
        validation = context.validation_definitions.add(
            gx.ValidationDefinition(name=f"{suite.name}-validation", data=definition, suite=suite))
        # results stay in the context's store; Data Docs are built from all of them once, at the end
        self.checkpoint = context.checkpoints.add(gx.Checkpoint(
            name=f"{suite.name}-gate", validation_definitions=[validation], actions=[],
            result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [ROW]}))
        self.columns = {c for e in suite.expectations if (c := e.configuration.kwargs.get("column"))}
        self.outcomes: dict[tuple[str, str | None], list[int]] = {}  # (type, column) -> [failed chunks, count]

    def run(self, frame) -> dict[int, list[str]]:
        result = self.checkpoint.run(batch_parameters={"dataframe": frame})
        reasons: dict[int, list[str]] = {}
        for validation in result.run_results.values():
            for r in validation.results:
                cfg = r.expectation_config
                column = cfg.kwargs.get("column")
                if r.exception_info and r.exception_info.get("raised_exception"):
                    raise TuneloopError(f"quality suite {self.name}: {cfg.type} on {column!r} could not run:"
                                        f" {r.exception_info.get('exception_message')}")
                unexpected = r.result.get("unexpected_index_list") or []
                tally = self.outcomes.setdefault((cfg.type, column), [0, 0])
                tally[0] += not r.success
                tally[1] += len(unexpected)
                label = f"{cfg.type}({column})" if column else cfg.type
                for item in unexpected:
                    reasons.setdefault(int(item[ROW]), []).append(label)
        return reasons
