"""The Great Expectations adapter: suites read from JSON, validated chunk by chunk, failing rows named by
the file and line they came from (as the quarantine names them).

Data Docs show one validation result per suite for the whole run, merged from the chunks' and holding the
run-wide checks that GX cannot make per chunk (uniqueness): the same expectations, outcomes and counts as
the gate's summary and ``tuneloop check``, and the same line numbers as the quarantine.

GX validates tables, not nested JSON: the gate hands it the mapped fields and the flattened chat columns.
"""

from __future__ import annotations

import html
import json
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from uuid import uuid4

from tuneloop.core.records import ExpectationOutcome, TuneloopError

UNIQUE = "expect_column_values_to_be_unique"
KEPT_ROWS = 1000  # failing rows per expectation listed in Data Docs; the quarantine lists them all
SHOWN_CHARS = 200  # a failing value is cut to this in Data Docs (not a 10 MB body, 1000 times); quarantine keeps it


def shown(value: Any) -> Any:
    """A failing value as Data Docs show it: text cut to SHOWN_CHARS with an ellipsis."""
    return value[:SHOWN_CHARS - 1] + "\u2026" if isinstance(value, str) and len(value) > SHOWN_CHARS else value


def _slug(text: str, limit: int = 40) -> str:
    words = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-").split("-")
    slug = ""
    for word in words:  # whole words, up to the limit
        if slug and len(slug) + 1 + len(word) > limit:
            break
        slug = f"{slug}-{word}" if slug else word[:limit]
    return slug


def check_title(meta: dict[str, Any] | None) -> str | None:
    """What a suite calls one expectation, for people: its meta's ``name``, else ``why``, else ``PII: KIND``."""
    meta = meta or {}
    return next((v for v in (meta.get("name"), meta.get("why")) if isinstance(v, str) and v), None) \
        or (f"PII: {meta['pii']}" if meta.get("pii") else None)


def _check_name(meta: dict[str, Any] | None) -> str | None:
    """The title as a key part (``pii-email``, ``control-characters-and-nul-bytes``)."""
    title = check_title(meta)
    return (_slug(title) or None) if title else None


def expectation_keys(configs: list[Any]) -> list[tuple[str, str | None]]:
    """Each expectation's key and, where its type and column are not unique in the suite, the check name that
    tells it from the others: ``expect_column_values_to_not_match_regex.body`` alone; ``...body.pii-email`` and
    ``...body.control-characters-and-nul-bytes`` side by side; its place among them (``.3``: the third, in suite
    order) where the meta names nothing. Stable while the suite is, unique in it, metric-safe (``[A-Za-z0-9_-./]``):
    outcomes, MLflow metrics and quarantine reasons tell two regexes on one column apart."""
    bases = [re.sub(r"[^A-Za-z0-9_./-]", "_", f"{c.type}.{c.kwargs['column']}" if c.kwargs.get("column") else c.type)
             for c in configs]
    counts = Counter(bases)
    names: list[str | None] = []
    seen: Counter = Counter()
    for base, config in zip(bases, configs, strict=True):
        if counts[base] == 1:
            names.append(None)
            continue
        seen[base] += 1
        names.append(_check_name(config.meta) or str(seen[base]))
    keys = [f"{b}.{n}" if n else b for b, n in zip(bases, names, strict=True)]
    repeated = Counter(keys)  # two checks with the same name on one column: numbered too
    out, taken = [], set()
    for i, (key, name) in enumerate(zip(keys, names, strict=True)):
        if repeated[key] > 1 or key in taken:
            name = f"{name}-{i + 1}" if name else str(i + 1)
            key = f"{bases[i]}.{name}"
        taken.add(key)
        out.append((key, name))
    return out


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
    key: str = ""  # expectation_keys: unique in the suite
    check: str | None = None  # the name telling it from others of its type and column, where there are any

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
        column = self.config.kwargs.get("column")
        self.unexpected_values += [shown(v) for v in values[:room]]
        self.unexpected_rows += [{**row, column: shown(row[column])} if column in row else row for row in index[:room]]

    def result(self, where_all: str, index_columns: list[str], for_html: bool = False) -> dict[str, Any]:
        """GX's result dict. ``for_html``: text values escaped, because GX 1.24 writes unexpected values into its
        pages as they are (a ticket quoting HTML would become markup, a ``<script>`` in the data would run)."""
        if not self.per_row:
            return escaped(self.aggregate) if for_html else self.aggregate  # observed values can quote the data
        nonmissing = self.element_count - self.missing_count

        def percent(n: int, of: int) -> float:
            return 100 * n / of if of else 0.0

        def text(value: Any) -> Any:
            return html.escape(value) if for_html and isinstance(value, str) else value

        values = [text(v) for v in self.unexpected_values]
        rows = [{k: text(v) for k, v in row.items()} for row in self.unexpected_rows]
        counts = Counter(v if isinstance(v, str | int | float | bool | None) else repr(v) for v in values)
        return {
            "element_count": self.element_count, "missing_count": self.missing_count,
            "missing_percent": percent(self.missing_count, self.element_count),
            "unexpected_count": self.unexpected_count,
            "unexpected_percent": percent(self.unexpected_count, nonmissing),
            "unexpected_percent_nonmissing": percent(self.unexpected_count, nonmissing),
            "unexpected_percent_total": percent(self.unexpected_count, self.element_count),
            "partial_unexpected_list": values[:20],
            "partial_unexpected_counts": [{"value": v, "count": n} for v, n in counts.most_common(20)],
            "partial_unexpected_index_list": rows[:20],
            "unexpected_list": values,
            "unexpected_index_list": rows,
            "unexpected_index_column_names": index_columns,
            **({"unexpected_index_query": text(where_all)} if self.unexpected_count else {}),
        }


def escaped(value: Any) -> Any:
    """Every text leaf HTML-escaped: what GX writes into a page unescaped (values, file names) is text."""
    if isinstance(value, str):
        return html.escape(value)
    if isinstance(value, dict):
        return {k: escaped(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [escaped(v) for v in value]
    return value


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
        for tally, (key, check) in zip(self.tallies, expectation_keys([t.config for t in self.tallies]), strict=True):
            tally.key, tally.check = key, check
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
            label = self.reason(tally)
            if unexpected and not position:
                position = {key: k for k, key in enumerate(zip(files, lines, strict=True))}
            for item in unexpected:
                reasons.setdefault(position[(item[self.file], item[self.line])], []).append(label)
        return reasons

    def reason(self, tally: Tally) -> str:
        """A quarantine reason: ``type(column)``, with ``[check name]`` after it where the type and column
        are not unique in the suite (two regexes on one column: which one failed)."""
        column = tally.config.kwargs.get("column")
        label = f"{tally.config.type}({column})" if column else tally.config.type
        return f"{label} [{tally.check}]" if tally.check else label

    def run_wide_reason(self, type_: str, column: str) -> str:
        return self.reason(self.run_wide[(type_, column)])

    def add_run_wide(self, type_: str, column: str, rows: int, missing: int,
                     unexpected: list[tuple[Any, str, int]]) -> None:
        """The gate's own check of a run-wide expectation on one chunk: unexpected as (value, file, line)."""
        self.run_wide[(type_, column)].add_rows(
            rows, missing, len(unexpected), [v for v, _, _ in unexpected],
            [{self.file: f, self.line: n, column: v} for v, f, n in unexpected])

    def outcomes(self) -> list[ExpectationOutcome]:
        """One per expectation that ran, keyed by ``expectation_keys``: suite order, run-wide last."""
        if not self.n_chunks:
            return []
        return [ExpectationOutcome(suite=self.name, key=t.key, expectation=t.config.type,
                                   column=t.config.kwargs.get("column"), title=check_title(t.config.meta),
                                   success=t.success, unexpected_count=t.unexpected_count) for t in self.tallies]

    def store_result(self, run_name: str, where_all: str) -> dict[str, Any] | None:
        """The run's validation result, put in the context's store for Data Docs to render (values escaped);
        returned as JSON (values as they are, long ones cut)."""
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
        # never GX's "__none__"; it names a folder and shows in pages: letters, digits and ._- only
        run_name = re.sub(r"[^A-Za-z0-9._-]+", "-", run_name or asset).strip("-") or "run"
        run_id = RunIdentifier(run_name=run_name, run_time=self.started)
        suite_id = ExpectationSuiteIdentifier(name=self.name)

        def suite_result(for_html: bool):
            results = [ExpectationValidationResult(
                success=t.success, expectation_config=t.config, result=t.result(where_all, index_columns, for_html),
                exception_info={"raised_exception": False, "exception_message": None, "exception_traceback": None})
                for t in self.tallies]
            n_ok = sum(r.success for r in results)
            return ExpectationSuiteValidationResult(
                success=n_ok == len(results), results=results, suite_name=self.name,
                statistics={"evaluated_expectations": len(results), "successful_expectations": n_ok,
                            "unsuccessful_expectations": len(results) - n_ok,
                            "success_percent": 100 * n_ok / len(results) if results else None},
                meta={"great_expectations_version": gx.__version__, "run_id": run_id,
                      "validation_time": self.started.isoformat(),
                      "batch_markers": {"rows": self.n_rows, "chunks": self.n_chunks},
                      "batch_parameters": None,
                      "batch_spec": {"data_asset_name": html.escape(asset) if for_html else asset},
                      "active_batch_definition": {
                          "datasource_name": f"{self.name}-source", "data_asset_name": self.name,
                          "data_connector_name": "fluent", "batch_identifiers": {}}})

        self.context.validation_results_store.store_validation_results(
            suite_validation_result=suite_result(for_html=True),
            suite_validation_result_identifier=ValidationResultIdentifier(
                expectation_suite_identifier=suite_id, run_id=run_id, batch_identifier=f"{self.name}-run"),
            expectation_suite_identifier=suite_id)
        return suite_result(for_html=False).to_json_dict()
