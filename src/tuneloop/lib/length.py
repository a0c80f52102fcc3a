"""The length policy: what happens to an example longer than the trainer's token limit.

A trainer truncates an over-long example from the right, and the right end of a chat example is its
answer: the one part the loss is computed on. So an example is never handed over too long. Either the
middle of its user message(s) is cut (the system message, the start and the end of the prompt and the whole
answer stay), or it is set aside with reason ``too_many_tokens``. Counting is done by the same counter the
export uses, so "fits" means fits for the tokenizer and template that will train on it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from tuneloop.core.records import ChatExample

MARKER = " [...] "
MAX_ROUNDS = 12


@dataclass
class LengthOutcome:
    kept: list[ChatExample]
    counts: list[int]  # tokens of each kept example, after trimming
    trimmed: int = 0
    set_aside: list[dict] = field(default_factory=list)  # quarantine entries, reason too_many_tokens


def trim_prompt(messages: list[dict], count: Callable[[list[dict]], int], limit: int) -> tuple[list[dict], int] | None:
    """The messages with the middle of the longest user message(s) cut until they fit, or None when even
    the system message and the answer alone do not fit."""
    msgs = [dict(m) for m in messages]
    n = count(msgs)
    for _ in range(MAX_ROUNDS):
        if n <= limit:
            return msgs, n
        users = [i for i, m in enumerate(msgs) if m.get("role") == "user" and isinstance(m.get("content"), str)
                 and len(m["content"]) > len(MARKER) + 2]
        if not users:
            return None
        i = max(users, key=lambda k: len(msgs[k]["content"]))
        text = msgs[i]["content"]
        chars = sum(len(m["content"]) for m in msgs if isinstance(m.get("content"), str)) or 1
        per_token = max(chars / max(n, 1), 0.5)
        # a little more than the excess: a cut lands mid-word and re-tokenizes differently
        cut = math.ceil(((n - limit) * 1.1 + 4) * per_token) + len(MARKER)
        keep = len(text) - cut
        if keep < 2:
            msgs[i]["content"] = MARKER.strip()
        else:
            head = keep // 2
            msgs[i]["content"] = text[:head].rstrip() + MARKER + text[len(text) - (keep - head):].lstrip()
        n = count(msgs)
    return (msgs, n) if n <= limit else None


def apply_length_policy(examples: list[ChatExample], counts: list[int], count: Callable[[list[dict]], int],
                        limit: int, policy: str, counted_with: str) -> LengthOutcome:
    """Every example within ``limit`` tokens, by ``policy`` (trim_prompt | quarantine); none cut through its answer."""
    out = LengthOutcome(kept=[], counts=[])
    for example, n in zip(examples, counts, strict=True):
        if n <= limit:
            out.kept.append(example)
            out.counts.append(n)
            continue
        fitted = trim_prompt(example.messages, count, limit) if policy == "trim_prompt" else None
        if fitted is None:
            why = (f"{n} tokens ({counted_with}), over the {limit}-token limit" + (
                "; the system message and the answer alone do not fit" if policy == "trim_prompt" else ""))
            out.set_aside.append({"reason": "too_many_tokens", "detail": why, "record_id": example.record_id,
                                  "source": example.source, "line": example.line, "tokens": n, "limit": limit,
                                  "messages": example.messages})
            continue
        messages, fitted_n = fitted
        out.kept.append(example.model_copy(update={"messages": messages}))
        out.counts.append(fitted_n)
        out.trimmed += 1
    return out
