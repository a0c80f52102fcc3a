"""The length policy: what happens to an example longer than the trainer's token limit.

A trainer truncates an over-long example from the right, and the right end of a chat example is its
answer: the one part the loss is computed on. So an example is never handed over too long. Either the
middle of its user message(s) is cut (the system message, the start and the end of the prompt and the whole
answer stay), or it is set aside with reason ``too_many_tokens`` and the detail that is true of it: the
policy is ``quarantine``, the system message and the answer alone do not fit, or fitting would keep less of
the prompt than the floor (a ticket cut to "[...]" would teach the model to answer what it never saw). The
held-out prompts are held to the same limit, so evaluation asks what training saw. Counting is done by the same counter the
export uses, so "fits" means fits for the tokenizer and template that will train on it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tuneloop.core.records import ChatExample
from tuneloop.lib.heldout import HeldOutExample

MARKER = " [...] "
# A trimmed user message keeps at least this share of its text, or this many characters (about 30 tokens) of a
# long one: below that the model would be trained to answer a prompt it never saw (a ticket cut down to "[...]").
MIN_KEPT_SHARE = 0.25
ENOUGH_KEPT_CHARS = 128


@dataclass
class LengthOutcome:
    kept: list[ChatExample]
    counts: list[int]  # tokens of each kept example, after trimming
    trimmed: int = 0
    set_aside: list[dict] = field(default_factory=list)  # quarantine entries, reason too_many_tokens
    no_room: int = 0  # of set_aside: the system message and the answer alone are over the limit
    below_floor: int = 0  # of set_aside: fitting would keep too little of the prompt (MIN_KEPT_SHARE)


def _cut(text: str, keep: int) -> str:
    """``text`` with its middle replaced by the marker, ``keep`` characters of it left (half each end)."""
    if keep < 2:
        return MARKER.strip()
    head = keep // 2
    return text[:head].rstrip() + MARKER + text[len(text) - (keep - head):].lstrip()


def kept_enough(original: str, trimmed: str) -> bool:
    kept = len(trimmed.replace(MARKER.strip(), "").strip())
    return kept >= min(ENOUGH_KEPT_CHARS, MIN_KEPT_SHARE * len(original.strip()))


def trim_prompt(messages: list[dict], count: Callable[[list[dict]], int], limit: int) -> tuple[list[dict], int] | str:
    """The messages with the middle of the longest user message(s) cut until they fit, or why they cannot be
    made to fit: the system message and the answer alone are over the limit (``no_room``), or fitting would
    keep less of a user message than the floor (``below_floor``)."""
    msgs = [dict(m) for m in messages]
    originals = {i: m["content"] for i, m in enumerate(msgs) if m.get("role") == "user" and isinstance(m.get("content"), str)}
    bare = [{**m, "content": MARKER.strip()} if i in originals else m for i, m in enumerate(msgs)]
    if count(bare) > limit:
        return "no_room"
    n = count(msgs)
    # the longest user message first, then the next while still over: the most of each that fits, found by
    # bisection on the characters kept (a guess from chars per token overshoots where the template's own
    # tokens are dense, and cut 3,600 characters to 50 when 260 fit)
    for i in sorted(originals, key=lambda k: -len(originals[k])):
        if n <= limit:
            break
        text = originals[i]
        lo, hi = 0, len(text) - 1
        while lo < hi:
            mid = (lo + hi + 1) // 2
            msgs[i]["content"] = _cut(text, mid)
            if count(msgs) <= limit:
                lo = mid
            else:
                hi = mid - 1
        msgs[i]["content"] = _cut(text, lo)
        n = count(msgs)
    if n > limit or not all(kept_enough(originals[i], msgs[i]["content"]) for i in originals):
        return "below_floor"
    return msgs, n


def apply_length_policy(examples: list[ChatExample], counts: list[int], count: Callable[[list[dict]], int],
                        limit: int, policy: str, counted_with: str) -> LengthOutcome:
    """Every example within ``limit`` tokens, by ``policy`` (trim_prompt | quarantine); none cut through its answer,
    none trimmed below the floor, and each one set aside with the reason that is true of it."""
    out = LengthOutcome(kept=[], counts=[])
    for example, n in zip(examples, counts, strict=True):
        if n <= limit:
            out.kept.append(example)
            out.counts.append(n)
            continue
        fitted = trim_prompt(example.messages, count, limit) if policy == "trim_prompt" else "quarantine"
        if isinstance(fitted, str):
            why = f"{n} tokens ({counted_with}), over the {limit}-token limit" + {
                "quarantine": "",
                "no_room": "; the system message and the answer alone do not fit",
                "below_floor": f"; trimming the user message to fit would keep less than {MIN_KEPT_SHARE:.0%} of it "
                               f"(or {ENOUGH_KEPT_CHARS} characters): raise train.local.max_length"}[fitted]
            out.no_room += fitted == "no_room"
            out.below_floor += fitted == "below_floor"
            out.set_aside.append({"reason": "too_many_tokens", "detail": why, "record_id": example.record_id,
                                  "source": example.source, "line": example.line, "tokens": n, "limit": limit,
                                  "messages": example.messages})
            continue
        messages, fitted_n = fitted
        out.kept.append(example.model_copy(update={"messages": messages}))
        out.counts.append(fitted_n)
        out.trimmed += 1
    return out


def fit_heldout(heldout: list[HeldOutExample], count: Callable[[list[dict]], int], limit: int,
                policy: str) -> tuple[list[HeldOutExample], int, list[dict]]:
    """The held-out examples under the training limit by the same policy, each with its reference as the answer
    (as its training twin would be): (fitted, how many trimmed, set-aside entries). Evaluation then asks
    prompts of the length training saw."""
    as_examples = [ChatExample(messages=[*h.prompt, {"role": "assistant", "content": h.expected}],
                               record_id=h.record_id, source="heldout", line=i + 1, content_hash=h.content_hash)
                   for i, h in enumerate(heldout)]
    counts = [count(e.messages) for e in as_examples]
    outcome = apply_length_policy(as_examples, counts, count, limit, policy, "heldout")
    fitted = [heldout[e.line - 1].model_copy(update={"prompt": e.messages[:-1]}) for e in outcome.kept]
    return fitted, outcome.trimmed, outcome.set_aside
