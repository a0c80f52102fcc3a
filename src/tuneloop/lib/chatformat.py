"""Chat-format validation: the checks a fine-tuning service runs on upload, run before anything is paid for.

Codes follow OpenAI's published data-preparation recipe (``data_type``, ``missing_messages_list``,
``message_missing_key``, ``message_unrecognized_key``, ``unrecognized_role``, ``missing_content``,
``example_missing_assistant_message``) so its users recognise them, plus what that recipe misses:
``invalid_json``, ``example_unrecognized_key``, ``invalid_tool_calls``, ``invalid_tool_message``,
``invalid_tools``, ``invalid_weight`` (the recipe crashes on a numeric weight), ``last_message_not_assistant``,
and, for whole files, ``too_few_examples``, ``file_too_large`` and, with a token counter, ``too_many_tokens``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
MESSAGE_KEYS = frozenset({"role", "content", "name", "function_call", "tool_calls", "tool_call_id", "weight"})
EXAMPLE_KEYS = frozenset({"messages", "tools", "parallel_tool_calls", "functions"})
MIN_EXAMPLES = 10  # OpenAI refuses a training file with fewer
MAX_FILE_BYTES = 512 * 2**20  # OpenAI's limit on one fine-tuning file

# Codes that make an example unusable; ``too_many_tokens`` is a warning: the service truncates.
WARNINGS = frozenset({"too_many_tokens"})


def _valid_tool_call(call: Any) -> bool:
    if not isinstance(call, dict) or not isinstance(call.get("id"), str) or call.get("type", "function") != "function":
        return False
    fn = call.get("function")
    return isinstance(fn, dict) and isinstance(fn.get("name"), str) and bool(fn["name"]) \
        and isinstance(fn.get("arguments"), str)


def _valid_tools(tools: Any) -> bool:
    return isinstance(tools, list) and all(
        isinstance(t, dict) and t.get("type") == "function" and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str) for t in tools)


# The common shape, checked in one pass: role and non-empty text content only, no tool role, ending with the
# assistant. Such an example has no code; anything else takes the full check.
PLAIN_KEYS = frozenset({"role", "content"})
PLAIN_ROLES = frozenset({"system", "developer", "user", "assistant"})


def _plain(messages: Any) -> bool:
    if messages.__class__ is not list or not messages:
        return False
    for message in messages:
        if message.__class__ is not dict or message.keys() != PLAIN_KEYS or message["role"].__class__ is not str \
                or message["role"] not in PLAIN_ROLES:
            return False
        content = message["content"]
        if content.__class__ is not str or not content:
            return False
    return messages[-1]["role"] == "assistant"


def example_errors(example: Any) -> list[str]:
    """Every code that applies to one parsed line, each once, in a stable order."""
    if not isinstance(example, dict):
        return ["data_type"]
    if len(example) == 1 and _plain(example.get("messages")):
        return []
    codes: list[str] = []
    add = codes.append
    if any(k not in EXAMPLE_KEYS for k in example):
        add("example_unrecognized_key")
    if "tools" in example and not _valid_tools(example["tools"]):
        add("invalid_tools")
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        add("missing_messages_list")
        return codes
    call_ids: set[str] = set()
    has_assistant = False
    for message in messages:
        if not isinstance(message, dict):
            add("message_missing_key")
            continue
        if "role" not in message or ("content" not in message and "tool_calls" not in message
                                     and "function_call" not in message):
            add("message_missing_key")
        if any(k not in MESSAGE_KEYS for k in message):
            add("message_unrecognized_key")
        role = message.get("role")
        if not isinstance(role, str) or role not in ROLES:  # a list or dict is not a role (nor hashable)
            add("unrecognized_role")
        content = message.get("content")
        calls = message.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, list) or not calls or not all(map(_valid_tool_call, calls)):
                add("invalid_tool_calls")
            else:
                call_ids.update(c["id"] for c in calls)
        if not ((isinstance(content, str) and content) or
                (content is None and role == "assistant" and (calls or message.get("function_call")))):
            add("missing_content")
        if role == "tool" and message.get("tool_call_id") not in call_ids:
            add("invalid_tool_message")
        if "weight" in message and (message["weight"] not in (0, 1) or isinstance(message["weight"], bool)
                                    or role != "assistant"):
            add("invalid_weight")
        has_assistant = has_assistant or role == "assistant"
    if not has_assistant:
        add("example_missing_assistant_message")
    elif not isinstance(messages[-1], dict) or messages[-1].get("role") != "assistant":
        add("last_message_not_assistant")
    return list(dict.fromkeys(codes))


@dataclass
class ChatFileReport:
    """One file's verdict: per-line codes, file-level codes, and how many lines each code hit."""

    path: Path
    n_lines: int = 0
    n_examples: int = 0
    size_bytes: int = 0
    line_codes: dict[int, list[str]] = field(default_factory=dict)
    file_codes: list[str] = field(default_factory=list)
    token_counts: list[int] = field(default_factory=list)
    token_limit: int | None = None

    @property
    def counts(self) -> dict[str, int]:
        tally = Counter(c for codes in self.line_codes.values() for c in codes)
        tally.update(self.file_codes)
        return dict(sorted(tally.items()))

    @property
    def ok(self) -> bool:
        """True when nothing but warnings was found: the file can be uploaded as it is."""
        return not self.file_codes and all(c in WARNINGS for codes in self.line_codes.values() for c in codes)

    def to_json(self) -> dict[str, Any]:
        return {
            "file": str(self.path), "ok": self.ok, "lines": self.n_lines, "examples": self.n_examples,
            "bytes": self.size_bytes, "counts": self.counts, "file_errors": self.file_codes,
            "token_limit": self.token_limit,
            "lines_with_codes": [{"line": n, "codes": c} for n, c in sorted(self.line_codes.items())],
        }


def validate_chat_file(path: Path, count_tokens: Callable[[list[list[dict]]], list[int]] | None = None,
                       token_limit: int | None = None) -> ChatFileReport:
    """Validate a chat JSONL file line by line; with a counter, also flag examples over ``token_limit``."""
    report = ChatFileReport(path=path, size_bytes=path.stat().st_size, token_limit=token_limit)
    countable: list[tuple[int, list[dict]]] = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            report.n_lines = lineno
            if not raw.strip():
                continue
            report.n_examples += 1
            try:
                example = orjson.loads(raw)
            except orjson.JSONDecodeError:
                report.line_codes[lineno] = ["invalid_json"]
                continue
            codes = example_errors(example)
            if codes:
                report.line_codes[lineno] = codes
            elif count_tokens is not None:
                countable.append((lineno, example["messages"]))
    if count_tokens is not None and countable:
        report.token_counts = count_tokens([m for _, m in countable])
        if token_limit is not None:
            for (lineno, _), n in zip(countable, report.token_counts, strict=True):
                if n > token_limit:
                    report.line_codes.setdefault(lineno, []).append("too_many_tokens")
    if report.n_examples < MIN_EXAMPLES:
        report.file_codes.append("too_few_examples")
    if report.size_bytes > MAX_FILE_BYTES:
        report.file_codes.append("file_too_large")
    return report
