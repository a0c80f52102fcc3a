"""Export: a dataset version as chat-format JSONL (train + validation), validated, token-counted, costed.

What a paid job consumes is checked here, before upload: every example against the chat format (the
codes of lib/chatformat.py), every token counted with the tokenizer that will train on it, the billed
tokens and the cost estimated. Held-out evaluation examples are removed first and their absence is
asserted after the split, so a score is never inflated by an example the model was trained on.

Exports are content-addressed (dataset version + export settings + tokenizer + held-out set): the same
inputs find the finished files and reuse them.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import orjson
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from tuneloop.core.config import ExportConfig, OpenAITrainConfig, TrainConfig
from tuneloop.core.records import ChatExample, DatasetVersion, ExportedDataset, TokenStats, TuneloopError
from tuneloop.core.state import gc_paused, sha256_file, write_atomically
from tuneloop.lib.chatformat import example_errors
from tuneloop.lib.datasets import read_examples_in_chunks
from tuneloop.lib.heldout import HeldOutExample, prompt_keys
from tuneloop.lib.length import MIN_KEPT_SHARE, apply_length_policy, fit_heldout
from tuneloop.lib.runlog import stage_logger
from tuneloop.lib.tokens import ChatTemplateCounter, TokenCounter, estimate_cost, token_stats


@dataclass
class TokenPlan:
    """How the training backend will see the examples: its tokenizer, its length limit, its price (if paid)."""

    counter: TokenCounter
    limit: int
    openai: OpenAITrainConfig | None = None
    model: str | None = None

    def key(self) -> str:
        paid = self.openai.model_dump_json() if self.openai else ""
        return hashlib.sha256(f"{self.counter.name}|{self.limit}|{self.model}|{paid}".encode()).hexdigest()[:8]


def token_plan(train: TrainConfig, models_dir: Path, home: Path | None = None, log=None) -> TokenPlan:
    """Count as the backend will: OpenAI models with tiktoken against the model's context and price;
    the local backend with its base model's tokenizer and chat template (the trainer's view)."""
    from tuneloop.core.models import load_tokenizer
    from tuneloop.lib.base_model import resolve_base_model

    if train.uses_api:
        from tuneloop.lib.tokens import openai_counter

        cfg = train.openai
        counter = openai_counter(cfg.model, cfg, home or models_dir.parent)
        return TokenPlan(counter=counter, limit=cfg.spec().context_tokens, openai=cfg, model=cfg.model)

    source = resolve_base_model(train, models_dir, log)  # a GGUF base is converted here, first, with its progress
    counter = ChatTemplateCounter(load_tokenizer(source), str(train.base_model), train.local.chat_template)
    return TokenPlan(counter=counter, limit=train.local.max_length)


def validation_size(n: int, fraction: float, minimum: int = 1) -> int:
    """``fraction`` of the examples, raised to ``minimum`` where a quarter of them allows it."""
    return max(round(n * fraction), min(minimum, n // 4), 1 if n > 1 else 0)


def split_examples(examples: list[ChatExample], fraction: float, seed: str,
                   minimum: int = 1) -> tuple[list, list]:
    """Deterministic for a dataset version and seed whatever order the examples came in; stratified by
    label, so a rare queue is in both splits (a label's last example always trains); at least one validation
    example, and ``validation_size`` when ``minimum`` raised it (topped up from the largest labels)."""
    n = len(examples)
    want = validation_size(n, fraction, minimum)
    raised = want > round(n * fraction)
    fraction = max(fraction, want / n) if n else fraction
    groups: dict[str, list[ChatExample]] = defaultdict(list)
    for e in examples:
        groups[e.label or ""].append(e)
    split: dict[str, int] = {}
    for label in sorted(groups):
        ordered = sorted(groups[label], key=lambda e: e.content_hash)
        random.Random(f"{seed}:{label}").shuffle(ordered)
        groups[label] = ordered
        split[label] = min(round(len(ordered) * fraction), len(ordered) - 1)
    target = want if raised else min(1, want)
    while sum(split.values()) < target:  # rounding fell short: one more from the label with most left to train
        label = max(sorted(groups), key=lambda lab: len(groups[lab]) - split[lab])
        if len(groups[label]) - split[label] < 2:
            break  # every label is down to its last training example: fewer validation examples, not a lost label
        split[label] += 1
    if not any(split.values()) and n > 1:  # every label is a single example: one still validates, as always
        split[max(sorted(groups), key=lambda lab: len(groups[lab]))] = 1
    train = [e for label in sorted(groups) for e in groups[label][split[label]:]]
    validation = [e for label in sorted(groups) for e in groups[label][:split[label]]]
    return train, validation


def remove_heldout(examples: list[ChatExample], heldout: list[HeldOutExample]) -> tuple[list[ChatExample], int]:
    """Drop every example that asks a held-out question (normalized user text) or is a held-out example."""
    from tuneloop.core.mapping import content_hash

    if not heldout:
        return examples, 0
    held_prompts = set(prompt_keys([h.prompt for h in heldout]))
    held_hashes = {content_hash([*h.prompt, {"role": "assistant", "content": h.expected}]) for h in heldout}
    keys = prompt_keys([e.messages for e in examples])
    clean = [e for e, k in zip(examples, keys, strict=True) if k not in held_prompts and e.content_hash not in held_hashes]
    return clean, len(examples) - len(clean)


def assert_no_heldout(splits: dict[str, list[ChatExample]], heldout: list[HeldOutExample]) -> None:
    """Checked again on what is about to be written, independently of how the removal was done."""
    if not heldout:
        return
    held = set(prompt_keys([h.prompt for h in heldout]))
    for name, examples in splits.items():
        leaked = [e for e, k in zip(examples, prompt_keys([e.messages for e in examples]), strict=True) if k in held]
        if leaked:
            raise RuntimeError(f"export: {len(leaked)} held-out examples in {name}, e.g. {leaked[0].record_id}")


def validate_examples(examples: list[ChatExample]) -> None:
    """The snapshot came through the gate, so a bad example here is rare; one is still never uploaded."""
    bad = [(e, codes) for e in examples if (codes := example_errors({"messages": e.messages}))]
    if bad:
        shown = "; ".join(f"{e.source}:{e.line} ({e.record_id}): {', '.join(c)}" for e, c in bad[:5])
        raise TuneloopError(f"export: {len(bad)} examples are not valid chat examples: {shown}"
                            + (f"; and {len(bad) - 5} more" if len(bad) > 5 else ""))


def _reraise(exc: Exception):
    raise exc


def write_jsonl(path: Path, examples: list[ChatExample]) -> str:
    """The file's SHA-256, hashed as it is written rather than read back; hashing and writing (both outside
    the GIL) run on a second thread while the next block is serialized."""
    digest = hashlib.sha256()
    dumps = orjson.dumps
    with path.open("wb") as fh, ThreadPoolExecutor(1, thread_name_prefix="write") as sink:
        done = []
        for i in range(0, len(examples), 10_000):
            blob = b"".join([b'{"messages":' + dumps(e.messages) + b"}\n" for e in examples[i:i + 10_000]])
            if done:
                done.pop().result()  # in order, and a write error surfaces here
            done.append(sink.submit(lambda b: (digest.update(b), fh.write(b)), blob))
        for future in done:
            future.result()
    return digest.hexdigest()


def _export_key(export: ExportConfig, plan: TokenPlan | None, heldout: list[HeldOutExample]) -> str:
    held = hashlib.sha256("\n".join(sorted(prompt_keys([h.prompt for h in heldout]))).encode()).hexdigest()
    parts = [export.model_dump_json(), plan.key() if plan else "-", held]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:8]


def _reuse(directory: Path) -> ExportedDataset | None:
    """A finished export (its record is written last) whose files still hash as recorded, with its paths
    read from where it is now (a state folder copied elsewhere trains on its own files)."""
    record = directory / "export.json"
    if not record.is_file():
        return None
    try:
        exported = ExportedDataset.model_validate_json(record.read_bytes())
    except ValueError:  # a torn or edited record: the export is made again
        return None
    for name, digest in exported.sha256.items():
        path = directory / name
        if not path.is_file() or sha256_file(path) != digest:
            stage_logger().warning(f"export: {path} does not match its recorded sha256; exporting again")
            return None
    return exported.model_copy(update={
        "reused": True, "directory": directory, "train_path": directory / "train.jsonl",
        "validation_path": directory / "validation.jsonl", "manifest_path": directory / "manifest.json"})


def check_overlap(n_examples: int, n_clean: int, export: ExportConfig, min_examples: int) -> None:
    """What the held-out set leaves for training, before any token is counted: enough, and not a held-out set
    that is really the training data under another name."""
    removed = n_examples - n_clean
    if n_examples and removed / n_examples > export.max_heldout_overlap:
        raise TuneloopError(
            f"export: the held-out set removes {removed} of {n_examples} examples ({removed / n_examples:.0%}; "
            f"export.max_heldout_overlap is {export.max_heldout_overlap:.0%}): evaluate.holdout holds (a copy of) "
            "the training data. Point it at examples kept out of the source, or raise the limit if this is meant")
    if n_clean < min_examples:
        raise TuneloopError(f"export: only {n_clean} examples left for training after removing {removed} held-out "
                            f"overlaps; quality.min_examples is {min_examples}")


def export_chat_jsonl(
    dataset: DatasetVersion, export: ExportConfig, heldout: list[HeldOutExample], exports_dir: Path,
    plan: TokenPlan | None = None, config_hash: str = "", min_examples: int = 2,
) -> ExportedDataset:
    """``min_examples`` (quality.min_examples) applies to what is left for training, held-out overlaps and
    examples over the token limit removed."""
    with gc_paused():  # every example is a few dozen acyclic objects
        return _export(dataset, export, heldout, exports_dir, plan, config_hash, min_examples)


def _export(dataset: DatasetVersion, export: ExportConfig, heldout: list[HeldOutExample], exports_dir: Path,
            plan: TokenPlan | None, config_hash: str, min_examples: int) -> ExportedDataset:
    min_examples = max(min_examples, 2)
    directory = exports_dir / f"{dataset.version}-{_export_key(export, plan, heldout)}"
    if (found := _reuse(directory)) is not None:
        check_overlap(found.n_train + found.n_validation + found.n_heldout_overlaps + found.n_too_long,
                      found.n_train + found.n_validation + found.n_too_long, export, min_examples)
        return found
    # Parsing holds the GIL and the encoders release it: each chunk is counted on a second thread while the
    # next one is parsed (and while the examples are checked). Counted before the split, so an example is
    # fitted to the limit once, wherever it goes.
    with ThreadPoolExecutor(1, thread_name_prefix="count") as pool:
        snapshot_hash = pool.submit(sha256_file, dataset.path)  # hashing, too, runs outside the GIL
        examples: list[ChatExample] = []
        pending = []
        for chunk in read_examples_in_chunks(dataset.path):
            examples += chunk
            if plan is not None:  # only the encoder's half leaves, for the other core
                try:
                    pending.append(pool.submit(plan.counter.finish, plan.counter.prepare([e.messages for e in chunk])))
                except Exception as exc:  # raised after the examples are checked: a bad example is named first
                    pending.append(pool.submit(_reraise, exc))
        try:
            clean, overlaps = remove_heldout(examples, heldout)
            check_overlap(len(examples), len(clean), export, min_examples)
            validate_examples(clean)
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
        counted = [n for future in pending for n in future.result()]
        snapshot_sha256 = snapshot_hash.result()
    fitted, n_trimmed, too_long = None, 0, []
    if plan is not None:
        if len(clean) < len(examples):
            of = {id(e): n for e, n in zip(examples, counted, strict=True)}
            counted = [of[id(e)] for e in clean]
        counts = counted
        fitted = apply_length_policy(clean, counts, lambda m: plan.counter.count([m])[0], plan.limit,
                                     export.too_long, plan.counter.name)
        clean, n_trimmed, too_long = fitted.kept, fitted.trimmed, fitted.set_aside
        if len(clean) < min_examples:
            raise TuneloopError(f"export: only {len(clean)} examples fit the {plan.limit}-token limit "
                                f"({len(too_long)} set aside as too_many_tokens; quality.min_examples is "
                                f"{min_examples}); raise the limit")
    fitted_heldout, n_heldout_trimmed, heldout_too_long = heldout, 0, []
    if plan is not None and heldout:  # evaluation asks prompts of the length training saw
        fitted_heldout, n_heldout_trimmed, heldout_too_long = fit_heldout(
            heldout, lambda m: plan.counter.count([m])[0], plan.limit, export.too_long)
        if not fitted_heldout:
            raise TuneloopError(f"export: none of the {len(heldout)} held-out examples fits the {plan.limit}-token "
                                "limit with its reference answer: raise the limit (train.local.max_length)")
    train, validation = split_examples(clean, export.validation_fraction, f"{export.seed}:{dataset.version}",
                                       export.min_validation)
    assert_no_heldout({"train": train, "validation": validation}, heldout)

    stats: dict[str, TokenStats] = {}
    estimate = None
    if fitted is not None:
        tokens_of = {id(e): n for e, n in zip(fitted.kept, fitted.counts, strict=True)}
        train_counts, val_counts = [tokens_of[id(e)] for e in train], [tokens_of[id(e)] for e in validation]
        for name, part in (("train", train_counts), ("validation", val_counts)):
            stats[name] = token_stats(part, plan.limit, plan.counter.name)
        if plan.openai is not None:
            estimate = estimate_cost(train_counts, plan.model or plan.openai.model, plan.openai)

    import tempfile

    exports_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=exports_dir))  # one per run
    sha = {"train.jsonl": write_jsonl(tmp / "train.jsonl", train),
           "validation.jsonl": write_jsonl(tmp / "validation.jsonl", validation)}
    if too_long:  # accounted for, like the gate's quarantine: with the reason and where the record came from
        (tmp / "too_long.jsonl").write_bytes(b"".join(orjson.dumps(q) + b"\n" for q in too_long))
    if heldout:
        (tmp / "heldout.jsonl").write_bytes(b"".join(orjson.dumps(h.model_dump(mode="json")) + b"\n"
                                                     for h in fitted_heldout))
    if heldout_too_long:
        (tmp / "heldout_too_long.jsonl").write_bytes(b"".join(orjson.dumps(q) + b"\n" for q in heldout_too_long))
    manifest = {
        "dataset_version": dataset.version,
        "snapshot": str(dataset.path),
        "snapshot_sha256": snapshot_sha256,
        "config_hash": config_hash,
        "split_seed": export.seed,
        "validation_fraction": export.validation_fraction,
        "min_validation": export.min_validation,
        "counts": {"train": len(train), "validation": len(validation), "heldout_overlaps_removed": overlaps,
                   "prompt_trimmed": n_trimmed, "too_many_tokens": len(too_long),
                   "too_many_tokens_no_room": fitted.no_room if fitted else 0,
                   "too_many_tokens_below_floor": fitted.below_floor if fitted else 0,
                   "heldout": len(fitted_heldout), "heldout_prompt_trimmed": n_heldout_trimmed,
                   "heldout_too_many_tokens": len(heldout_too_long)},
        "too_long": export.too_long,
        "labels": {name: dict(sorted(Counter(e.label for e in part if e.label is not None).items()))
                   for name, part in (("train", train), ("validation", validation))},
        "tokens": {name: s.model_dump() for name, s in stats.items()},
        "estimate": estimate.model_dump() if estimate else None,
        "sha256": sha,
    }
    (tmp / "manifest.json").write_bytes(orjson.dumps(manifest, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    if directory.exists():  # a half-finished or damaged earlier try: replaced whole
        import shutil

        shutil.rmtree(directory)
    tmp.rename(directory)
    exported = ExportedDataset(
        dataset_version=dataset.version, directory=directory, train_path=directory / "train.jsonl",
        validation_path=directory / "validation.jsonl", manifest_path=directory / "manifest.json",
        n_train=len(train), n_validation=len(validation), sha256=sha, n_heldout_overlaps=overlaps,
        n_prompt_trimmed=n_trimmed, n_too_long=len(too_long), token_stats=stats, estimate=estimate,
        n_too_long_no_room=fitted.no_room if fitted else 0, n_too_long_below_floor=fitted.below_floor if fitted else 0,
        heldout_path=directory / "heldout.jsonl" if heldout else None, n_heldout=len(fitted_heldout),
        n_heldout_trimmed=n_heldout_trimmed, n_heldout_too_long=len(heldout_too_long),
    )
    write_atomically(directory / "export.json", exported.model_dump_json(indent=2).encode())  # last: the export is done
    return exported


def manifest_summary(exported: ExportedDataset) -> str:
    """One paragraph for logs and the CLI."""
    lines = [f"export {exported.dataset_version}: {exported.n_train} train + {exported.n_validation} validation"
             f" examples ({exported.n_heldout_overlaps} held-out overlaps removed) in {exported.directory}"
             + (" [reused]" if exported.reused else "")]
    if exported.n_prompt_trimmed or exported.n_too_long:
        why = [f"{n} {what}" for n, what in ((exported.n_too_long_no_room, "whose system message and answer alone "
                                              "do not fit"),
                                             (exported.n_too_long_below_floor, "whose prompt would be trimmed below "
                                              f"the floor ({MIN_KEPT_SHARE:.0%} of it)")) if n]
        lines.append(f"  over the token limit: {exported.n_prompt_trimmed} prompts trimmed in the middle (answers "
                     f"kept whole), {exported.n_too_long} examples set aside as too_many_tokens"
                     + (f" ({', '.join(why)})" if why else "")
                     + (f" in {exported.directory / 'too_long.jsonl'}" if exported.n_too_long else ""))
    if exported.n_heldout_trimmed or exported.n_heldout_too_long:
        lines.append(f"  held-out, held to the same limit: {exported.n_heldout} evaluated, "
                     f"{exported.n_heldout_trimmed} prompts trimmed, {exported.n_heldout_too_long} set aside"
                     + (f" ({exported.directory / 'heldout_too_long.jsonl'})" if exported.n_heldout_too_long else ""))
    for name, s in exported.token_stats.items():
        over = f", {s.n_over_limit} over the {s.limit}-token limit" if s.limit else ""
        lines.append(f"  {name} tokens ({s.counted_with}): total {s.total:,}, min {s.min}, p50 {s.p50},"
                     f" p95 {s.p95}, max {s.max}{over}")
    if e := exported.estimate:
        lines.append(f"  estimate for {e.model}: {e.epochs} epochs x {e.tokens_per_epoch:,} tokens ="
                     f" {e.billed_tokens:,} billed tokens, about ${e.estimated_cost_usd:,.2f}")
    return "\n".join(lines)


# Not cached by Prefect: a cached result would skip the check that the files on disk are the ones recorded
# (a truncated train.jsonl would be trained on). The export's own reuse checks them, at the cost of one hash.
@task(name="export", cache_policy=NO_CACHE)
def export_task(dataset: DatasetVersion, export: ExportConfig, heldout: list[HeldOutExample],
                exports_dir: Path, plan: TokenPlan | None = None, config_hash: str = "",
                min_examples: int = 2) -> ExportedDataset:
    exported = export_chat_jsonl(dataset, export, heldout, exports_dir, plan, config_hash, min_examples)
    get_run_logger().info(manifest_summary(exported))
    return exported


@task(name="token-plan", cache_policy=NO_CACHE)
def token_plan_task(train: TrainConfig, models_dir: Path, home: Path | None = None) -> TokenPlan:
    return token_plan(train, models_dir, home, get_run_logger())
