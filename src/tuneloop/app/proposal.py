"""Propose a starting pipeline for a profiled sample: what ``tuneloop init`` writes from ``app/profile.py``'s
measurements.

The id field, the label field (classification) or the answer field (generation), the text fields the user
message is made of, the prompt templates, a quality suite for *these* columns (bounds with headroom, the
label set seen) and a held-out split that keeps every label. Plain functions, no Prefect and no Great
Expectations.
"""

from __future__ import annotations

import math
import random
import re
from dataclasses import dataclass, field
from typing import Any

from tuneloop.app.profile import (
    ANSWER_NAMES,
    CONTROL_CHARS,
    ID_NAMES,
    LABEL_NAMES,
    MAX_LABELS,
    MAX_MISSING,
    TIME_NAMES,
    UPDATED_NAMES,
    ColumnProfile,
    SampleProfile,
    Task,
    as_text,
    name_tokens,
)
from tuneloop.core.records import TuneloopError


@dataclass
class Choices:
    """What the user decided on the command line; None / empty: propose from the data."""

    id: str | None = None
    label: str | None = None
    text: list[str] = field(default_factory=list)
    answer: str | None = None
    task: Task | None = None
    watermark: str | None = None



@dataclass
class Proposal:
    task: Task
    id: str | None
    label: str | None
    text: list[str]
    answer: str | None
    messages: str | None = None
    watermark: str | None = None
    label_values: list[str] = field(default_factory=list)
    why: dict[str, str] = field(default_factory=dict)  # role -> what to check, for the config's comments

    def mapped(self) -> list[str]:
        """Every column the mapping reads (and so the suite may check)."""
        names = [self.id, *self.text, self.answer, self.label, self.messages]
        return list(dict.fromkeys(n for n in names if n))



def _formattable(name: str) -> bool:
    """A column a ``str.format`` template can name: ``{a.b}``, ``{a[0]}``, ``{a:b}`` would mean something else."""
    return bool(name) and not any(c in name for c in ".[]{}:!")



def _need_column(profile: SampleProfile, flag: str, name: str) -> None:
    if name not in profile.columns:
        raise TuneloopError(f"{flag} {name}: {profile.where} has no column {name!r} "
                            f"(columns: {', '.join(profile.names())})")



def _first(candidates: list[ColumnProfile], names: set[str]) -> ColumnProfile | None:
    """The first candidate whose name has one of ``names`` as a word, else the first candidate."""
    named = [c for c in candidates if set(name_tokens(c.name)) & names]
    return (named or candidates or [None])[0]



def _describe_values(col: ColumnProfile) -> str:
    return f"{col.n_distinct} values" if not col.counts else ", ".join(
        f"{v} ({k})" for v, k in sorted(col.counts.items(), key=lambda kv: -kv[1])[:12]) + (
        ", ..." if len(col.counts) > 12 else "")



def propose(profile: SampleProfile, choices: Choices) -> Proposal:
    """The id, label, text and answer fields and the task, from the sample unless ``choices`` says."""
    cols, where, n = profile.columns, profile.where, profile.n
    for flag, name in (("--id", choices.id), ("--label", choices.label), ("--answer", choices.answer),
                       ("--watermark", choices.watermark), *(("--text", t) for t in choices.text)):
        if name is not None:
            _need_column(profile, flag, name)
    for flag, name in (("--label", choices.label), ("--answer", choices.answer), *(("--text", t) for t in choices.text)):
        if name is not None and not _formattable(name):
            raise TuneloopError(f"{flag} {name}: a template cannot name a column whose name holds one of . : ! {{ }} or a square bracket; "
                                "rename the column in the source")
    why: dict[str, str] = {}

    # id: a column whose values are all present and distinct, an id-like name first
    if choices.id:
        id_ = choices.id
        col = cols[id_]
        dupes = col.n - col.n_missing - col.n_distinct
        why["id"] = (f"unique in all {n} sampled records" if col.unique else
                     f"{dupes} repeated and {col.n_missing} missing values in the sample: the gate quarantines "
                     "every repeat after the first and every missing one")
    else:
        ids = [c for c in cols.values() if c.unique and n >= 2 and c.longest <= 100 and (
            (c.kind == "number" and c.integer) or (c.kind == "string" and c.whitespace_share == 0))]
        named = [c for c in ids if c.name.lower() in ID_NAMES or name_tokens(c.name)[-1:] == ["id"]
                 or c.name.lower().endswith("id")]
        pick = (named or ids or [None])[0]
        id_ = pick.name if pick else None
        why["id"] = (f"unique in all {n} sampled records" + ("" if named else ", though its name does not say id")
                     if pick else "no column is unique in the sample: records are identified by file and line;"
                     " set mapping.id to a unique column if there is one")

    # timestamp: for a SQL source's watermark, and never a text field
    times = [c for c in cols.values() if c.kind == "datetime" and c.missing_share == 0]
    if choices.watermark:
        watermark = choices.watermark
    else:
        updated = [c for c in times if set(name_tokens(c.name)) & UPDATED_NAMES]
        watermark = (updated or [c for c in times if set(name_tokens(c.name)) & TIME_NAMES] or times or [None])[0]
        watermark = watermark.name if watermark else None
    taken = {id_, watermark}

    # a column holding chat messages replaces the templates
    chats = [c for c in cols.values() if c.kind == "messages" and c.name not in taken]
    messages = chats[0].name if chats and not choices.text and not choices.answer else None

    # label: a few distinct one-line values, each repeated
    label = choices.label
    if label:
        col = cols[label]
        if col.multiline:
            raise TuneloopError(f"--label {label}: some of its values in {where} span lines; a label is one line")
        if col.n_distinct > MAX_LABELS:  # its values are not kept for a suite's value set: say so, not fail later
            raise TuneloopError(f"--label {label}: {col.n_distinct} distinct values in {where}, more than the "
                                f"{MAX_LABELS} a label set may have here; pick a coarser field, or --task generation")
    elif choices.task != "generation" and not messages:
        labels = [c for c in cols.values() if c.name not in taken and c.categorical and c.missing_share <= MAX_MISSING
                  and _formattable(c.name) and (c.kind == "string" or (
                      c.kind in ("number", "bool") and set(name_tokens(c.name)) & LABEL_NAMES))]
        pick = _first(labels, LABEL_NAMES)
        label = pick.name if pick else None
        others = [c for c in labels if c is not pick]
        if pick:
            why["label"] = (f"{pick.n_distinct} labels: {_describe_values(pick)}"
                            + (f"; other candidates: {', '.join(f'{c.name} ({c.n_distinct} values)' for c in others)}"
                               if others else ""))
    task: Task = choices.task or ("classification" if label else "generation")
    if task == "classification" and not label:
        raise TuneloopError(f"{where}: no label field (a column with 2-{MAX_LABELS} distinct one-line values, each "
                            "repeated) for a classification task: pass --label COLUMN, or --task generation")
    if label:
        taken.add(label)
        col = cols[label]
        values = sorted(col.counts) if col.counts else []
    else:
        values = []

    # text fields: long or many-word strings, rarely missing; the answer among them by name
    texts = [c for c in cols.values() if c.name not in taken and c.texty and c.missing_share <= MAX_MISSING
             and _formattable(c.name)]
    answer = choices.answer
    if answer is None and not messages:
        named = [c for c in texts if set(name_tokens(c.name)) & ANSWER_NAMES and c.name not in choices.text]
        if named:
            answer = named[0].name
            why["answer"] = "its name says it is the answer"
        elif task == "generation" and len(texts) >= 2 and not choices.text:
            answer = texts[-1].name
            why["answer"] = ("the last text column (no column is named like answer, reply, response, output, "
                             "summary): make sure it is what the model should write")
    text = list(choices.text) or [c.name for c in texts if c.name != answer]
    if not messages and not text:
        strings = [f"{c.name} ({c.kind}{f', median {c.p50} chars' if c.kind == 'string' else ''})"
                   for c in cols.values() if c.name not in taken and c.name != answer]
        raise TuneloopError(f"{where}: no usable text field (a string column of sentences, present in at least "
                            f"{1 - MAX_MISSING:.0%} of records) among: {', '.join(strings) or 'no other columns'};"
                            " pass --text COLUMN")
    if task == "generation" and not messages and not answer:
        raise TuneloopError(f"{where}: no answer field for a generation task and no label field for a "
                            "classification task: pass --answer COLUMN or --label COLUMN")
    skipped = [c for c in cols.values() if c.kind == "string" and c.name not in taken and c.name not in text
               and c.name != answer and c.name != messages and c.texty and c.missing_share > MAX_MISSING]
    why["text"] = ", ".join(f"{name} (median {cols[name].p50} chars)" for name in text)
    if skipped:
        why["text"] += ("; left out, missing too often: "
                        + ", ".join(f"{c.name} ({c.missing_share:.0%} missing)" for c in skipped))
    return Proposal(task=task, id=id_, label=label, text=text, answer=answer, messages=messages,
                    watermark=watermark, label_values=values, why=why)



def _title(name: str) -> str:
    return " ".join(name_tokens(name)).capitalize() or name



MAX_LISTED_LABELS = 60  # beyond this, the system prompt would be mostly a list


def _label_set(values: list[str]) -> str:
    """The label set a base model needs in its prompt to answer zero-shot at all (and a fine-tuned one keeps);
    braces doubled, since the system message is a template."""
    values = [v.replace("{", "{{").replace("}", "}}") for v in values]
    if not values:
        return "with one of the labels of the data"
    if len(values) > MAX_LISTED_LABELS:
        return f"with one of {len(values)} labels, e.g. " + ", ".join(values[:10])
    return "where it is one of: " + ", ".join(values)


@dataclass
class Templates:
    system: str | None
    user: str | None
    assistant: str | None
    label_pattern: str | None  # classification: parses the label as the assistant template writes it



def templates_for(proposal: Proposal) -> Templates:
    """The user message is the text fields (titled when there are several); the assistant writes
    ``<label column>: <label>`` on its first line (classification), then the answer field if there is one."""
    if proposal.messages:
        return Templates(None, None, None, None)
    p = proposal
    user = f"{{{p.text[0]}}}" if len(p.text) == 1 else "\n\n".join(f"{_title(t)}: {{{t}}}" for t in p.text)
    inputs = " and ".join(_title(t).lower() for t in p.text)
    if p.task == "classification":
        assert p.label
        assistant = f"{p.label}: {{{p.label}}}" + (f"\n{{{p.answer}}}" if p.answer else "")
        # \A: the label is the answer's first line; the group runs from its first to its last visible character
        # on that line (labels may hold spaces), with or without re.MULTILINE
        pattern = r"\A\s*" + re.escape(p.label) + r":[ \t]*(\S(?:[^\n]*\S)?)"
        system = (f"Read the {inputs} and answer with the {_title(p.label).lower()} on the first line, written "
                  f"exactly as `{p.label}: <{p.label}>`, {_label_set(p.label_values)}"
                  + (f"; then write the {_title(p.answer).lower()}." if p.answer else "."))
    else:
        assert p.answer
        assistant, pattern = f"{{{p.answer}}}", None
        system = f"Read the {inputs} and write the {_title(p.answer).lower()}."
    return Templates(system=system, user=user, assistant=assistant, label_pattern=pattern)



def nice_ceil(value: float) -> int:
    """Rounded up to two significant digits: 1734 -> 1800, 87 -> 87, 9.2 -> 10."""
    if value <= 10:
        return max(1, math.ceil(value))
    step = 10 ** (int(math.log10(value)) - 1)
    return int(math.ceil(value / step) * step)



def length_bound(col: ColumnProfile) -> int:
    """Twice the sample's 99th percentile, rounded up: room for longer-than-usual values without letting
    through runaway ones (a pasted log, two records merged by a broken export). Unlike the longest value, the
    99th percentile is not set by the one outlier this check exists to catch."""
    return nice_ceil(max(2 * col.p99, 10))



def suite_for(profile: SampleProfile, proposal: Proposal, name: str = "records") -> dict[str, Any]:
    """A Great Expectations suite (the JSON of expectations/raw_records.json) for the mapped columns."""
    cols = profile.columns
    out: list[dict[str, Any]] = []

    def expect(kind: str, column: str, why: str | None = None, **kwargs: Any) -> None:
        entry: dict[str, Any] = {"type": kind, "kwargs": {"column": column, **kwargs}}
        if why:
            entry["meta"] = {"why": why}
        out.append(entry)

    p = proposal
    if p.id:
        expect("expect_column_values_to_not_be_null", p.id)
        expect("expect_column_values_to_be_unique", p.id, "the id identifies a record; a repeat is quarantined")
    for column in [*p.text, *([p.answer] if p.answer else [])]:
        col = cols[column]
        expect("expect_column_values_to_not_be_null", column)
        expect("expect_column_value_lengths_to_be_between", column,
               f"1 to 2x the sample's 99th percentile ({col.p99} chars), rounded up: room for longer-than-usual "
               f"values, and a stop for runaway ones (a pasted log, merged records); the sample's longest is "
               f"{col.longest}", min_value=1, max_value=length_bound(col))
        if col.n_control <= 0.01 * col.n:
            expect("expect_column_values_to_not_match_regex", column, "control characters and NUL bytes",
                   regex=CONTROL_CHARS)
    if p.label:
        expect("expect_column_values_to_not_be_null", p.label)
        expect("expect_column_values_to_be_in_set", p.label,
               f"the {len(p.label_values)} labels of the sample; add a new label here before records carry it",
               value_set=p.label_values)
    return {
        "name": name,
        "meta": {"notes": (
            f"Written by `tuneloop init` from {profile.where} ({profile.n} records) for the columns its mapping "
            "reads. Edit freely: each entry is a Great Expectations Core 1.x expectation. Rows failing any "
            "expectation go to quarantine with the expectation and column as the reason. "
            "expect_column_values_to_be_unique is enforced across the whole run (first record wins). "
            "PII is redacted by quality.pii before these checks.")},
        "expectations": out,
    }



def _fits(row: dict[str, Any], proposal: Proposal, bounds: dict[str, int]) -> bool:
    """A record the gate would accept on its own: every mapped field present, lengths within the suite's."""
    for column in proposal.mapped():
        text = as_text(row.get(column))
        if not text:
            return False
        if column in bounds and len(text) > bounds[column]:
            return False
    return not proposal.label or as_text(row.get(proposal.label)) in set(proposal.label_values)



def _allocate(sizes: dict[str, int], total: int) -> dict[str, int]:
    """``total`` split over groups in proportion to their size (largest remainders), each group of two or
    more records getting at least one while there are enough to go round, and none taking its last record."""
    n = sum(sizes.values())
    exact = {k: total * s / n for k, s in sizes.items()}
    share = {k: min(int(e), max(0, sizes[k] - 1)) for k, e in exact.items()}
    for k in sorted(sizes, key=lambda k: (-(exact[k] - int(exact[k])), k)):
        if sum(share.values()) >= total:
            break
        if share[k] < sizes[k] - 1:
            share[k] += 1
    for k in sorted(sizes, key=lambda k: -sizes[k]):  # a class missing from the held-out set is never scored
        if share[k] == 0 and sizes[k] >= 2:
            donor = max(share, key=lambda d: share[d])
            if share[donor] > 1:
                share[donor] -= 1
                share[k] = 1
    return share



@dataclass
class HoldoutSplit:
    rows: list[dict[str, Any]]
    n_eligible: int
    stratified_by: str | None
    per_label: dict[str, int]



def holdout_split(rows: list[dict[str, Any]], proposal: Proposal, suite: dict[str, Any], size: int,
                  seed: int = 0) -> HoldoutSplit:
    """``size`` records the gate would accept, drawn at random, in proportion to each label where there is one;
    kept in sample order."""
    bounds = {e["kwargs"]["column"]: e["kwargs"]["max_value"] for e in suite["expectations"]
              if e["type"] == "expect_column_value_lengths_to_be_between"}
    seen: set[str] = set()
    eligible: list[int] = []
    for i, row in enumerate(rows):
        if not _fits(row, proposal, bounds):
            continue
        key = as_text(row.get(proposal.id)) if proposal.id else None
        if key is not None and key in seen:
            continue
        if key is not None:
            seen.add(key)
        eligible.append(i)
    rng = random.Random(seed)
    if proposal.label:
        groups: dict[str, list[int]] = {}
        for i in eligible:
            groups.setdefault(str(as_text(rows[i].get(proposal.label))), []).append(i)
        share = _allocate({k: len(v) for k, v in groups.items()}, size) if eligible else {}
        picked = sorted(i for k, members in groups.items() for i in rng.sample(members, share[k]))
        per_label = {k: share[k] for k in sorted(groups)}
    else:
        picked = sorted(rng.sample(eligible, min(size, len(eligible))))
        per_label = {}
    return HoldoutSplit(rows=[rows[i] for i in picked], n_eligible=len(eligible),
                        stratified_by=proposal.label, per_label=per_label)
