"""Preflight: the whole configuration checked against itself and the data at hand, before any work.

Pydantic checks each key's type; this checks what only makes sense together: a regex that must compile,
templates whose fields the data must have, a label pattern that must read back every label the assistant
template writes, a suite whose label set must cover the held-out labels, a SQL source whose database driver
must be installed, a local base model that must be found and whose chat template must be trainable (its
tokenizer is loaded; the weights are not). A problem found here costs a second; found after training, it
costs the training. Every problem is one line; all are reported at once.
"""

from __future__ import annotations

import re
from pathlib import Path

import orjson

from tuneloop.core.config import PipelineConfig
from tuneloop.core.mapping import fields_of
from tuneloop.core.records import TuneloopError
from tuneloop.core.state import StateLayout, tuneloop_home
from tuneloop.lib.base_model import base_model_problems
from tuneloop.lib.metrics import parse_label

PLACEHOLDER = "lorem ipsum dolor"  # stands for a field's text when a template is rendered to test the pattern


class ConfigProblem(TuneloopError):
    """The configuration cannot work: the CLI exits 2, before any work."""


def _regex_problems(cfg: PipelineConfig) -> list[str]:
    problems = []
    try:
        pattern = re.compile(cfg.evaluate.label_pattern, re.MULTILINE)  # as evaluate compiles it
        if cfg.evaluate.task == "classification" and pattern.groups < 1:
            problems.append(f"evaluate.label_pattern {cfg.evaluate.label_pattern!r} has no group: its first "
                            "group is the predicted label, e.g. '^\\s*label:\\s*(\\S+)'")
    except re.error as exc:
        problems.append(f"evaluate.label_pattern {cfg.evaluate.label_pattern!r} is not a valid regex ({exc})")
    from tuneloop.core.pii import pii_kinds

    try:
        pii_kinds(cfg.quality)  # extra patterns must compile for Python and for Arrow's RE2; the phone region must exist
    except TuneloopError as exc:
        problems.append(str(exc))
    return problems


def suite_label_set(suite: Path, column: str) -> list[str] | None:
    """The label set a suite allows for ``column`` (expect_column_values_to_be_in_set), None when it sets none."""
    try:
        data = orjson.loads(suite.read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return None  # the gate says what is wrong with the suite file
    for e in data.get("expectations", []) if isinstance(data, dict) else []:
        kwargs = e.get("kwargs") or {}
        if e.get("type") == "expect_column_values_to_be_in_set" and kwargs.get("column") == column:
            return [str(v) for v in kwargs.get("value_set") or []]
    return None


def _heldout_records(path: Path, key: str = "evaluate.holdout", limit: int = 5000) -> tuple[list[dict], str | None]:
    """The held-out file's first records (JSONL), or the problem reading it."""
    if not path.is_file():
        return [], f"{key} {path} does not exist"
    if path.suffix.lower() != ".jsonl":
        return [], f"{key} {path}: a held-out file is JSONL (one record per line, the source's fields)"
    records = []
    with path.open("rb") as fh:
        for n, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = orjson.loads(line)
            except orjson.JSONDecodeError as exc:
                return [], f"{path}:{n}: not valid JSON ({exc})"
            if not isinstance(row, dict):
                return [], f"{path}:{n}: expected a JSON object"
            records.append(row)
            if len(records) >= limit:
                break
    return records, None


def render_assistant(template: str, label_field: str, label: str) -> str:
    """What the assistant template writes for ``label`` (other fields stand-in text)."""
    values = dict.fromkeys(fields_of(template), PLACEHOLDER)
    values[label_field] = label
    return template.format(**values)


def label_pattern_problems(cfg: PipelineConfig, labels: list[str]) -> list[str]:
    """Labels the pattern does not read back from the answer the assistant template writes for them."""
    m = cfg.mapping
    if cfg.evaluate.task != "classification" or not m.label or m.messages or not m.assistant \
            or m.label not in fields_of(m.assistant):
        return []
    pattern = re.compile(cfg.evaluate.label_pattern, re.MULTILINE)
    wrong = []
    for label in labels:
        got = parse_label(render_assistant(m.assistant, m.label, label), pattern)  # as evaluation parses it
        if got != label.strip():
            wrong.append(f"{label!r} -> {got!r}")
    if not wrong:
        return []
    return [f"evaluate.label_pattern {cfg.evaluate.label_pattern!r} does not read back {len(wrong)} of "
            f"{len(labels)} labels from what mapping.assistant writes ({', '.join(wrong[:3])}"
            + (", ..." if len(wrong) > 3 else "") + "): change the pattern and the template together"]


def azure_sdk_problem(cfg: PipelineConfig) -> str | None:
    """Managed Azure deployments need Microsoft's SDK (an optional extra): missing, that is found now, not after
    a paid training job, when the candidate is to be deployed."""
    azure = cfg.train.openai.azure_deployments
    if azure is None:  # (the config allows it with provider azure only)
        return None
    modules = ["azure.mgmt.cognitiveservices"] + ([] if azure.token_env else ["azure.identity"])
    missing = []
    for module in modules:
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if not missing:
        return None
    return (f"train.openai.azure_deployments is set, but {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed: pip install 'tuneloop[azure]'")


def preflight(cfg: PipelineConfig, models_dir: Path | None = None) -> list[str]:
    """Every problem of the configuration that can be found before collecting, one line each (``models_dir``:
    where converted base models are cached, the state folder's by default)."""
    problems = _regex_problems(cfg)
    problems += base_model_problems(cfg.train, models_dir or StateLayout(tuneloop_home()).models)
    if cfg.source.kind == "sql" and (problem := cfg.source.driver_problem()):  # before a connection is tried
        problems.append(problem)
    if problem := azure_sdk_problem(cfg):
        problems.append(problem)
    m, ev = cfg.mapping, cfg.evaluate
    if ev.task == "classification" and not m.label and not m.messages:
        problems.append("evaluate.task is classification but mapping.label is unset: name the field holding the "
                        "label, or use evaluate.task: generation")
    if m.label and m.assistant and not m.messages and ev.task == "classification" and m.label not in fields_of(m.assistant):
        problems.append(f"mapping.assistant {m.assistant!r} does not write the label field {{{m.label}}}: the "
                        "model could not learn to answer with it")
    records: list[dict] = []
    for key, path in (("evaluate.holdout", ev.holdout), ("evaluate.golden", ev.golden)):
        if path is None:
            continue
        found, problem = _heldout_records(path, key)
        if problem:
            problems.append(problem)
            continue
        if found and not m.messages:
            needed = sorted({f for t in (m.system, m.user, m.assistant) for f in fields_of(t)} - {m.label})
            missing = [f for f in needed if f not in found[0]]
            if missing:
                problems.append(f"{path}:1: no field {', '.join(missing)} that the mapping's templates read "
                                f"(it has: {', '.join(sorted(found[0]))})")
        records += found
    suite_labels = suite_label_set(cfg.quality.suite, m.label) if m.label else None
    held_labels = sorted({str(r[m.label]).strip() for r in records if m.label and r.get(m.label) not in (None, "")})
    if suite_labels is not None and held_labels:
        unknown = [label for label in held_labels if label not in suite_labels]
        if unknown:
            problems.append(f"quality suite {cfg.quality.suite} allows {len(suite_labels)} values of {m.label}, "
                            f"but the held-out file has {', '.join(map(repr, unknown[:5]))} too: the label sets "
                            "must match (add them to the suite's value_set, or fix the held-out file)")
    if not any(p.startswith("evaluate.label_pattern") for p in problems):
        problems += label_pattern_problems(cfg, sorted(set(suite_labels or []) | set(held_labels)))
    return problems


def ensure_ready(cfg: PipelineConfig, origin: str = "config") -> None:
    """Raise one ConfigProblem listing every problem (the CLI prints it and exits 2)."""
    problems = preflight(cfg)
    if problems:
        raise ConfigProblem(f"{origin}: " + problems[0] if len(problems) == 1
                            else f"{origin}: {len(problems)} problems\n  " + "\n  ".join(problems))
