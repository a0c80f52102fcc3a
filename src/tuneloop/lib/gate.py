"""The quality gate: records mapped to chat examples (core.mapping), exact duplicates dropped, two GX suites run.

Records stream through in chunks (bounded memory). Every record read ends in exactly one place:
accepted, quarantined (the failed expectations as reasons) or a duplicate of an earlier record; the
three side files are JSONL in the run folder and the counts reconcile.

Suites (``expectations/``): ``raw_records`` checks the mapped fields; ``chat_examples`` checks each
rendered chat example, flattened to columns because GX does not validate nested JSON. Uniqueness
expectations (``expect_column_values_to_be_unique``) are enforced across the whole run, not per chunk:
the first record with an id is kept, later ones with the same id are quarantined. Both kinds of outcome
reach the summary, ``tuneloop check`` and Data Docs from the same tallies, rows named by file and line.
PII found in ``quality.pii: quarantine`` mode and unparsable lines are quarantined outside GX: reasons
``pii:KIND(field)`` and ``parse: ...``, not expectations.
"""

from __future__ import annotations

import gc
import logging
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import orjson

from tuneloop.core.config import DistillConfig, MappingConfig, QualityConfig, SourceConfig
from tuneloop.core.mapping import PreparedChunk, RecordMapper, all_fields, answer_fields, flatten_chat
from tuneloop.core.records import CheckedBatch, ExpectationOutcome, QuarantineEntry, RawBatch, TuneloopError
from tuneloop.core.state import gc_paused
from tuneloop.lib.gx import UNIQUE, SuiteRunner, lineage_columns, load_suite


class QualityGate:
    """Feed it prepared chunks in source order, then ``finish()``: a CheckedBatch accounting for every record.

    Holds what depends on order: first-seen duplicates, run-wide uniqueness, the GX context (one per run:
    Data Docs show the run as one result per suite), the counts and the output files.
    """

    def __init__(self, mapping: MappingConfig, quality: QualityConfig, run_dir: Path,
                 distill: DistillConfig | None = None):
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        for name in ("great_expectations", "great_expectations.data_context.types.base"):  # the latter pins INFO
            logging.getLogger(name).setLevel(logging.WARNING)
        self.mapping, self.quality, self.run_dir = mapping, quality, run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        self.fields = [f for f in all_fields(mapping) if f != mapping.messages]

        # uniqueness is a property of the whole run, not of a chunk: enforced here, reported with the suite
        raw_suite, unique = load_suite(quality.suite, without=UNIQUE)
        chat_suite, _ = load_suite(quality.chat_suite)
        self.unique_columns = [e["kwargs"]["column"] for e in unique]
        missing = sorted((self._suite_columns(raw_suite) | set(self.unique_columns)) - set(self.fields))
        if missing:
            raise TuneloopError(
                f"quality suite {quality.suite} checks {', '.join(missing)}, which the mapping does not read"
                f" (mapped fields: {', '.join(self.fields)}); add them to mapping.metadata or edit the suite")
        self.raw_suite_name, self.chat_suite_name = raw_suite.name, chat_suite.name

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False)
        self.docs_dir = run_dir.resolve() / "data_docs" if quality.data_docs else None
        if self.docs_dir:
            from tuneloop.lib.data_docs import site_config

            context.add_data_docs_site(site_name="run", site_config=site_config(self.docs_dir))
        self.context = context
        self.lineage = lineage_columns(self.fields)
        self.raw = SuiteRunner(context, raw_suite, self.lineage, run_wide=unique)
        self.chat = SuiteRunner(context, chat_suite, self.lineage)

        # a record without its answer: the teacher's to answer (distill.teacher), else quarantined as such
        self.teacher = distill is not None and distill.teacher != "none"
        self.answer_all = self.teacher and distill.answer == "all"
        self.answer_fields = answer_fields(mapping)
        self.n_unlabelled = 0
        self.paths = {name: run_dir / f"{name}.jsonl" for name in ("accepted", "quarantine", "duplicates", "unlabelled")}
        self.out = {name: path.open("wb") for name, path in self.paths.items()}
        self.seen: dict[bytes, tuple[str, int]] = {}
        self.ids: dict[str, dict[str, tuple[str, int]]] = {c: {} for c in self.unique_columns}
        self.n_read = self.n_accepted = self.n_quarantined = self.n_duplicates = self.n_redacted = 0
        self.unread_sources: list[str] = []

    @staticmethod
    def _suite_columns(suite) -> set[str]:
        return {c for e in suite.expectations if (c := e.configuration.kwargs.get("column"))}

    def _quarantine(self, source: str, line: int, reasons: list[str], record: Any) -> None:
        self.n_quarantined += 1
        entry = QuarantineEntry(source=source, line=line, reasons=reasons, record=record)
        self.out["quarantine"].write(orjson.dumps(entry.model_dump(), default=str) + b"\n")

    def add(self, chunk: PreparedChunk) -> None:
        import pandas as pd

        self.n_read += len(chunk.keys) + len(chunk.unreadable)
        self.n_redacted += chunk.n_redacted
        for entry in chunk.unreadable:
            self._quarantine(entry.source, entry.line, entry.reasons, entry.record)
            if entry.line == 0 and not (isinstance(entry.record, dict) and entry.record.get("sha256")):
                self.unread_sources.append(entry.source)  # no content to take as consumed
        if not chunk.keys:
            return
        # exact duplicates first, so they are counted once and never quarantined
        keep: list[int] = []
        for i, key in enumerate(chunk.keys):
            origin = self.seen.get(key)
            if origin is not None:
                self.n_duplicates += 1
                self.out["duplicates"].write(orjson.dumps({
                    "source": chunk.sources[i], "line": chunk.lines[i],
                    "duplicate_of": {"source": origin[0], "line": origin[1]}}) + b"\n")
                continue
            self.seen[key] = (chunk.sources[i], chunk.lines[i])
            keep.append(i)

        file, line = self.lineage
        frame = pd.DataFrame({n: [chunk.columns[n][i] for i in keep] for n in self.fields}).astype(object)
        frame = frame.where(frame.notna(), None)
        frame[file] = [chunk.sources[i] for i in keep]
        frame[line] = pd.Series([chunk.lines[i] for i in keep], dtype="int64")
        reasons = self.raw.run(frame)
        for col in self.unique_columns:
            missing, repeated = 0, []
            for j, i in enumerate(keep):
                value = chunk.columns[col][i]
                if value is None:
                    missing += 1
                    continue
                first = self.ids[col].setdefault(str(value), (chunk.sources[i], chunk.lines[i]))
                if first != (chunk.sources[i], chunk.lines[i]):
                    repeated.append((value, chunk.sources[i], chunk.lines[i]))
                    reasons.setdefault(j, []).append(self.raw.run_wide_reason(UNIQUE, col))
            self.raw.add_run_wide(UNIQUE, col, len(keep), missing, repeated)
        for j, i in enumerate(keep):
            if i in chunk.pii_reasons:
                reasons.setdefault(j, []).extend(chunk.pii_reasons[i])
        to_answer = self._to_answer(chunk, keep, reasons)

        passing = [j for j in range(len(keep)) if j not in reasons and j not in to_answer]
        if passing:
            flat = chunk.flat.iloc[[keep[j] for j in passing]].reset_index(drop=True)
            flat[file] = [chunk.sources[keep[j]] for j in passing]
            flat[line] = pd.Series([chunk.lines[keep[j]] for j in passing], dtype="int64")
            for k, why in self.chat.run(flat).items():
                reasons.setdefault(passing[k], []).extend(why)
        # the teacher's rows meet the same chat suite: their prompt with a stand-in answer, so that only the checks
        # of the missing answer are waived (a chat opening with the assistant, or too long, is refused as usual)
        asked = list(to_answer)
        if asked:
            flat = pd.DataFrame([flatten_chat([*to_answer[j], {"role": "assistant", "content": "-"}]) for j in asked])
            flat[file] = [chunk.sources[keep[j]] for j in asked]
            flat[line] = pd.Series([chunk.lines[keep[j]] for j in asked], dtype="int64")
            for k, why in self.chat.run(flat).items():
                reasons.setdefault(asked[k], []).extend(why)

        write = self.out["accepted"].write
        for j, i in enumerate(keep):
            if j in reasons:
                self._quarantine(chunk.sources[i], chunk.lines[i], reasons[j], orjson.loads(chunk.records[i]))
            elif j in to_answer:
                example = orjson.loads(chunk.examples[i])
                example["prompt"] = to_answer[j]
                example["record"] = orjson.loads(chunk.records[i])
                del example["messages"], example["content_hash"]
                self.out["unlabelled"].write(orjson.dumps(example) + b"\n")
                self.n_unlabelled += 1
            else:
                write(chunk.examples[i])
                self.n_accepted += 1

    def _to_answer(self, chunk: PreparedChunk, keep: list[int], reasons: dict[int, list[str]]) -> dict[int, list]:
        """Rows (by position in ``keep``) the teacher is to answer, with the prompt it gets: those lacking an
        answer field (template mapping) or ending with a user turn (messages column); every row with
        ``distill.answer: all``. Failed checks of the answer fields no longer count against them (the answer is
        replaced); without a teacher such a row is quarantined ``missing_answer(field)``, whatever the suite
        checks: an empty answer must never be trained on as the text "None"."""
        m, out = self.mapping, {}
        if m.messages is not None and not self.teacher:
            return out  # the chat suite quarantines a chat that does not end with an answer
        if m.messages is None and not self.answer_fields and not self.answer_all:
            return out
        last_roles = chunk.flat["last_role"].tolist() if m.messages is not None else None
        for j, i in enumerate(keep):
            if last_roles is not None:
                missing = ["messages"] if last_roles[i] == "user" else []
                # a question for the teacher: its turns named as the prompt's (add() then runs the chat suite on it)
                row = chunk.flat.iloc[i]
                bad = [f"prompt:{name}" for name in ("n_malformed", "n_unknown_roles", "n_empty_content") if row[name]]
                if missing and bad:
                    reasons.setdefault(j, []).extend(bad)
                    continue
            else:
                missing = [f for f in self.answer_fields if chunk.columns[f][i] in (None, "")]
            if not missing and not self.answer_all:
                continue
            messages = orjson.loads(chunk.examples[i])["messages"]
            if not self.teacher:
                already = {reason_field(r) for r in reasons.get(j, [])}
                new = [f"missing_answer({f})" for f in missing if f not in already and f != "messages"]
                if new:
                    reasons.setdefault(j, []).extend(new)
                continue
            kept = [r for r in reasons.get(j, []) if reason_field(r) not in self.answer_fields]
            if kept:
                reasons[j] = kept
                continue
            reasons.pop(j, None)
            prompt = messages[:-1] if messages and isinstance(messages[-1], dict) and \
                messages[-1].get("role") == "assistant" else messages
            out[j] = prompt
        return out

    def outcomes(self) -> list[ExpectationOutcome]:
        """One per expectation of the suites, as Data Docs list them (two regexes on one column are two, each
        with its own key and count); run-wide checks after their suite's others."""
        return [*self.raw.outcomes(), *self.chat.outcomes()]

    def finish(self) -> CheckedBatch:
        for fh in self.out.values():
            fh.close()
        if not self.n_unlabelled:
            self.paths["unlabelled"].unlink(missing_ok=True)
        if self.docs_dir:
            where = f"{self.paths['quarantine']}: every rejected record, with its file, line and reasons"
            from tuneloop.lib.data_docs import make_offline

            run_name = self.run_dir.resolve().name  # `--out .` has no name of its own
            results = {runner.name: runner.store_result(run_name, where) for runner in (self.raw, self.chat)}
            self.context.build_data_docs(site_names=["run"])
            make_offline(self.docs_dir)
            for name, result in results.items():  # what the pages show, for machines
                if result is not None:
                    (self.docs_dir / f"{name}.validation.json").write_bytes(orjson.dumps(result, option=orjson.OPT_INDENT_2))
        summary_path = self.run_dir / "quality_summary.json"
        checked = CheckedBatch(
            accepted_path=self.paths["accepted"], quarantine_path=self.paths["quarantine"],
            duplicates_path=self.paths["duplicates"], summary_path=summary_path,
            data_docs=(self.docs_dir / "index.html") if self.docs_dir and (self.docs_dir / "index.html").exists() else None,
            n_read=self.n_read, n_accepted=self.n_accepted, n_quarantined=self.n_quarantined,
            n_duplicates=self.n_duplicates, n_redacted=self.n_redacted, expectations=self.outcomes(),
            unread_sources=self.unread_sources, n_unlabelled=self.n_unlabelled,
            unlabelled_path=self.paths["unlabelled"] if self.n_unlabelled else None,
        )
        if not checked.reconciles:
            raise RuntimeError(f"records lost: {checked.n_read} read, {checked.n_accepted} + {checked.n_quarantined}"
                               f" + {checked.n_duplicates} + {checked.n_unlabelled} unlabelled accounted for")
        summary_path.write_bytes(orjson.dumps(
            checked.model_dump(mode="json", exclude={"summary_path"}), option=orjson.OPT_INDENT_2))
        return checked


def reason_field(reason: str) -> str:
    """The field a quarantine reason names: ``type(field)``, ``type(field) [check]``, ``pii:KIND(field)``."""
    match = re.search(r"\(([^()]*)\)(?: \[[^\]]*\])?$", reason)
    return match[1] if match else reason


def _prepare_in_subprocess(raw: RawBatch, source: SourceConfig, mapping: MappingConfig, quality: QualityConfig,
                           queue, skip: int = 0) -> None:
    """Producer process: read and prepare chunks; the first ``skip`` are prepared by the parent while this
    process starts, and only their fingerprints are sent, for the parent to check it read the same."""
    from tuneloop.lib.readers import read_chunks

    try:
        preparer = RecordMapper(mapping, quality)
        with gc_paused():
            for i, chunk in enumerate(read_chunks(raw, source)):
                queue.put(preparer.prepare(chunk) if i >= skip else chunk.fingerprint())
        queue.put(None)
    except BaseException as exc:  # handed to the parent, which raises it where the user sees it
        queue.put(exc if isinstance(exc, TuneloopError) else RuntimeError(f"{type(exc).__name__}: {exc}"))


def prepared_chunks(raw: RawBatch, source: SourceConfig, mapping: MappingConfig, quality: QualityConfig,
                    in_subprocess: bool) -> Iterator[PreparedChunk]:
    from tuneloop.lib.readers import read_chunks

    preparer = RecordMapper(mapping, quality)
    if not in_subprocess:
        for chunk in read_chunks(raw, source):
            yield preparer.prepare(chunk)
        return
    import multiprocessing as mp

    ctx = mp.get_context("spawn")  # never fork a process that runs Prefect's threads
    queue = ctx.Queue(maxsize=2)  # bounded: at most a few chunks in memory
    # The child takes ~2 s to start (imports): this process prepares the first chunk meanwhile. Only for
    # files: rows of a SQL slice with equal watermarks may come back in another order on a second read.
    skip = 1 if raw.sql is None else 0
    proc = ctx.Process(target=_prepare_in_subprocess, args=(raw, source, mapping, quality, queue, skip), daemon=True)
    proc.start()
    try:
        first = next(iter(read_chunks(raw, source)), None) if skip else None
        if first is not None:
            yield preparer.prepare(first)
        while True:
            item = queue.get()
            if item is None:
                break
            if isinstance(item, BaseException):
                raise item
            if isinstance(item, str):  # the fingerprint of the chunk the child skipped
                if first is None or item != first.fingerprint():
                    raise TuneloopError("the landing files changed while the gate read them (a file was removed, "
                                        "locked or rewritten): nothing was consumed; run again")
                continue
            yield item
    finally:
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()


def use_subprocess(raw: RawBatch, quality: QualityConfig) -> bool:
    """Two cores pay off once a batch is large enough to amortize starting a process (~1 s)."""
    if quality.prepare_in_subprocess != "auto":
        return quality.prepare_in_subprocess == "always"
    size = sum(f.size for f in raw.files) + (raw.sql.n_rows * 500 if raw.sql else 0)
    return size >= 32 * 2**20 and (os.cpu_count() or 1) > 1


def check_batch(raw: RawBatch, source: SourceConfig, mapping: MappingConfig, quality: QualityConfig,
                run_dir: Path, distill: DistillConfig | None = None) -> CheckedBatch:
    gate = QualityGate(mapping, quality, run_dir, distill)
    # Records are many small acyclic objects: the collector is paused, and run on each chunk's leftovers
    # only (Great Expectations makes cycles), so garbage stays bounded by a chunk.
    with gc_paused():
        for chunk in prepared_chunks(raw, source, mapping, quality, use_subprocess(raw, quality)):
            gate.add(chunk)
            gc.collect(0)
    return gate.finish()


def read_accepted(path: Path) -> Iterable[dict[str, Any]]:
    with path.open("rb") as fh:
        for line in fh:
            if line.strip():
                yield orjson.loads(line)


