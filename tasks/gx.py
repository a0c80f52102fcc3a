"""The Great Expectations adapter: suites read from JSON, validated chunk by chunk, failing rows named by
the file and line they came from (as the quarantine names them).

Data Docs show one validation result per suite for the whole run, merged from the chunks' and holding the
run-wide checks that GX cannot make per chunk (uniqueness): the same expectations, outcomes and counts as
the gate's summary and ``tuneloop check``, and the same line numbers as the quarantine.

GX validates tables, not nested JSON: the gate hands it the mapped fields and the flattened chat columns.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

from tuneloop.core.records import TuneloopError

UNIQUE = "expect_column_values_to_be_unique"
KEPT_ROWS = 1000  # failing rows per expectation listed in Data Docs; the quarantine lists them all


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


def lineage_columns(taken: Iterable[str]) -> tuple[str, str]:
    """Names for the file and line columns: ``file`` and ``line``, with underscores before them where the
    data has columns of those names."""
    taken = set(taken)
    file, line = "file", "line"
    while file in taken or line in taken:
        file, line = f"_{file}", f"_{line}"
    return file, line


@dataclass
class Tally:
    """One expectation's outcome over the whole run, summed over chunks."""

    config: Any  # ExpectationConfiguration
    failed_chunks: int = 0
    element_count: int = 0
    missing_count: int = 0
    unexpected_count: int = 0
    unexpected_values: list[Any] = field(default_factory=list)
    unexpected_rows: list[dict[str, Any]] = field(default_factory=list)
    aggregate: dict[str, Any] | None = None  # a table-level expectation's result: the first failing chunk's, else the first

    @property
    def per_row(self) -> bool:
        return self.aggregate is None

    @property
    def success(self) -> bool:
        """Over the run, as GX would judge it: the share of unexpected non-null rows against ``mostly``."""
        if not self.per_row:
            return self.failed_chunks == 0
        nonmissing = self.element_count - self.missing_count
        mostly = self.config.kwargs.get("mostly", 1.0)
        return nonmissing == 0 or (nonmissing - self.unexpected_count) / nonmissing >= mostly

    def add_rows(self, rows: int, missing: int, unexpected: int, values: list[Any], index: list[dict[str, Any]]) -> None:
        self.element_count += rows
        self.missing_count += missing
        self.unexpected_count += unexpected
        room = KEPT_ROWS - len(self.unexpected_rows)
        self.unexpected_values += values[:room]
        self.unexpected_rows += index[:room]

    def result(self, where_all: str, index_columns: list[str]) -> dict[str, Any]:
        if not self.per_row:
            return self.aggregate
        nonmissing = self.element_count - self.missing_count

        def percent(n: int, of: int) -> float:
            return 100 * n / of if of else 0.0

        counts = Counter(v if isinstance(v, str | int | float | bool | None) else repr(v) for v in self.unexpected_values)
        return {
            "element_count": self.element_count, "missing_count": self.missing_count,
            "missing_percent": percent(self.missing_count, self.element_count),
            "unexpected_count": self.unexpected_count,
            "unexpected_percent": percent(self.unexpected_count, nonmissing),
            "unexpected_percent_nonmissing": percent(self.unexpected_count, nonmissing),
            "unexpected_percent_total": percent(self.unexpected_count, self.element_count),
            "partial_unexpected_list": self.unexpected_values[:20],
            "partial_unexpected_counts": [{"value": v, "count": n} for v, n in counts.most_common(20)],
            "partial_unexpected_index_list": self.unexpected_rows[:20],
            "unexpected_list": self.unexpected_values,
            "unexpected_index_list": self.unexpected_rows,
            "unexpected_index_column_names": index_columns,
            **({"unexpected_index_query": where_all} if self.unexpected_count else {}),
        }


class SuiteRunner:
    """One GX suite, validated chunk after chunk; every expectation's outcome tallied over the run.

    Expectations checked by the gate itself across chunks (``run_wide``) get a tally too, fed through
    ``add_run_wide``, so that the run's validation result (Data Docs) holds them with the others."""

    def __init__(self, context, suite, lineage: tuple[str, str], run_wide: Iterable[dict[str, Any]] = ()):
        import great_expectations as gx
        from great_expectations.expectations.expectation_configuration import ExpectationConfiguration

        self.context, self.name, self.suite = context, suite.name, suite
        for expectation in suite.expectations:  # GX returns results grouped by column: ids map them back
            expectation.id = expectation.id or str(uuid4())
        self.file, self.line = lineage
        self.batches = context.data_sources.add_pandas(f"{suite.name}-source").add_dataframe_asset(
            suite.name).add_batch_definition_whole_dataframe("chunk")
        self.result_format = {"result_format": "COMPLETE", "unexpected_index_column_names": [self.file, self.line]}
        self.by_id = {e.id: Tally(e.configuration) for e in suite.expectations}
        extra = [ExpectationConfiguration(type=e["type"], kwargs=e["kwargs"], meta=e.get("meta")) for e in run_wide]
        self.run_wide = {(c.type, c.kwargs.get("column")): Tally(c) for c in extra}
        self.tallies = [*self.by_id.values(), *self.run_wide.values()]  # suite order, run-wide checks last
        # the suite as written, run-wide checks included: Data Docs' suite page
        context.suites.add(gx.ExpectationSuite(name=suite.name, meta=suite.meta, expectations=[
            *[e.configuration.to_json_dict() for e in suite.expectations], *[c.to_json_dict() for c in extra]]))
        self.n_rows = self.n_chunks = 0
        self.sources: dict[str, None] = {}  # the files validated, in order
        self.started = datetime.now(UTC)

    def run(self, frame) -> dict[int, list[str]]:
        """Validate one chunk (with the file and line columns); the failed expectations of each row, by position."""
        from great_expectations.validator.v1_validator import Validator

        # what ValidationDefinition.run does, less storing a result per chunk (Batch.validate reads the batch twice)
        result = Validator(batch_definition=self.batches, batch_parameters={"dataframe": frame},
                           result_format=self.result_format).validate_expectation_suite(self.suite)
        self.n_rows += len(frame)
        self.n_chunks += 1
        files, lines = frame[self.file].tolist(), frame[self.line].tolist()
        self.sources.update(dict.fromkeys(files))
        position: dict[tuple[str, int], int] = {}  # built when a row fails
        reasons: dict[int, list[str]] = {}
        for r in result.results:
            cfg = r.expectation_config
            tally = self.by_id[cfg.id]
            column = cfg.kwargs.get("column")
            if r.exception_info and r.exception_info.get("raised_exception"):
                raise TuneloopError(f"quality suite {self.name}: {cfg.type} on {column!r} could not run:"
                                    f" {r.exception_info.get('exception_message')}")
            tally.failed_chunks += not r.success
            if "unexpected_count" not in r.result:
                if tally.aggregate is None or not r.success and tally.failed_chunks == 1:
                    tally.aggregate = dict(r.result)
                continue
            # GX hands index columns back as text: lines as the quarantine writes them, numbers
            unexpected = [{**item, self.line: int(item[self.line])} for item in r.result.get("unexpected_index_list") or []]
            tally.add_rows(r.result["element_count"], r.result.get("missing_count") or 0, r.result["unexpected_count"],
                           r.result.get("unexpected_list") or [], unexpected)
            label = f"{cfg.type}({column})" if column else cfg.type
            if unexpected and not position:
                position = {key: k for k, key in enumerate(zip(files, lines, strict=True))}
            for item in unexpected:
                reasons.setdefault(position[(item[self.file], item[self.line])], []).append(label)
        return reasons

    def add_run_wide(self, type_: str, column: str, rows: int, missing: int,
                     unexpected: list[tuple[Any, str, int]]) -> None:
        """The gate's own check of a run-wide expectation on one chunk: unexpected as (value, file, line)."""
        self.run_wide[(type_, column)].add_rows(
            rows, missing, len(unexpected), [v for v, _, _ in unexpected],
            [{self.file: f, self.line: n, column: v} for v, f, n in unexpected])

    def outcomes(self) -> list[tuple[str, str | None, bool, int]]:
        """(expectation, column, success, unexpected rows) for each expectation that ran: suite order, run-wide last."""
        return [(t.config.type, t.config.kwargs.get("column"), t.success, t.unexpected_count)
                for t in self.tallies if self.n_chunks]

    def store_result(self, run_name: str, where_all: str) -> dict[str, Any] | None:
        """The run's validation result, put in the context's store for Data Docs to render; returned as JSON."""
        import great_expectations as gx
        from great_expectations.core import ExpectationSuiteValidationResult, ExpectationValidationResult
        from great_expectations.core.run_identifier import RunIdentifier
        from great_expectations.data_context.types.resource_identifiers import (
            ExpectationSuiteIdentifier,
            ValidationResultIdentifier,
        )

        if not self.n_chunks:
            return None
        index_columns = [self.file, self.line]
        names = [Path(s).name for s in self.sources]
        asset = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        results = [ExpectationValidationResult(
            success=t.success, expectation_config=t.config, result=t.result(where_all, index_columns),
            exception_info={"raised_exception": False, "exception_message": None, "exception_traceback": None})
            for t in self.tallies]
        n_ok = sum(r.success for r in results)
        run_id = RunIdentifier(run_name=run_name, run_time=self.started)
        suite_id = ExpectationSuiteIdentifier(name=self.name)
        result = ExpectationSuiteValidationResult(
            success=n_ok == len(results), results=results, suite_name=self.name,
            statistics={"evaluated_expectations": len(results), "successful_expectations": n_ok,
                        "unsuccessful_expectations": len(results) - n_ok,
                        "success_percent": 100 * n_ok / len(results) if results else None},
            meta={"great_expectations_version": gx.__version__, "run_id": run_id,
                  "validation_time": self.started.isoformat(),
                  "batch_markers": {"rows": self.n_rows, "chunks": self.n_chunks},
                  "batch_parameters": None, "batch_spec": {"data_asset_name": asset},
                  "active_batch_definition": {"datasource_name": f"{self.name}-source", "data_asset_name": self.name,
                                              "data_connector_name": "fluent", "batch_identifiers": {}}})
        self.context.validation_results_store.store_validation_results(
            suite_validation_result=result,
            suite_validation_result_identifier=ValidationResultIdentifier(
                expectation_suite_identifier=suite_id, run_id=run_id, batch_identifier=f"{self.name}-run"),
            expectation_suite_identifier=suite_id)
        return result.to_json_dict()
