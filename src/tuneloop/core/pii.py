"""Personal data: found by pattern (and checksum where one exists), redacted as [KIND] or reported.

One pass of Arrow's RE2 over a whole column finds the few rows that may hold PII; only those take the
slower Python path. Used by the quality gate and the held-out reader alike, so a held-out example and its
training twin are redacted the same way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from tuneloop.core.config import QualityConfig
from tuneloop.core.records import TuneloopError


def luhn_ok(candidate: str) -> bool:
    digits = [int(c) for c in candidate if c.isdigit()]
    if not 13 <= len(digits) <= 19:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def iban_ok(candidate: str) -> bool:
    s = candidate.replace(" ", "").upper()
    if not 15 <= len(s) <= 34:
        return False
    rearranged = s[4:] + s[:4]
    return int("".join(str(int(c, 36)) for c in rearranged)) % 97 == 1


@dataclass(frozen=True)
class PiiKind:
    """A kind of personal data: a regex (valid in both RE2 and Python) and an optional checksum."""

    name: str
    pattern: str
    valid: Callable[[str], bool] | None = None


# Order matters: a card number is also a run of digits a phone pattern would take.
PII_KINDS: tuple[PiiKind, ...] = (
    PiiKind("CARD", r"\b(?:\d[ -]?){12,18}\d\b", luhn_ok),
    PiiKind("IBAN", r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]){11,30}\b", iban_ok),
    PiiKind("EMAIL", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"),
    PiiKind("PHONE", r"(?:\+\d{1,3}[ .-]?)?(?:\(\d{1,4}\)[ .-]?)?\b\d{2,4}[ .-]\d{3,4}[ .-]\d{3,5}\b"),
)


def pii_kinds(quality: QualityConfig) -> list[PiiKind]:
    import pyarrow as pa
    import pyarrow.compute as pc

    extra = [PiiKind(name.upper(), pattern) for name, pattern in quality.pii_patterns.items()]
    for kind in extra:
        try:
            re.compile(kind.pattern)
            pc.match_substring_regex(pa.array([""]), pattern=kind.pattern)  # Arrow's RE2 must take it too
        except (re.error, pa.ArrowInvalid) as exc:
            raise TuneloopError(f"quality.pii_patterns.{kind.name.lower()}: not a valid RE2/Python regex ({exc})") from None
    return [*PII_KINDS, *extra]


def scan_pii(values: list[str | None], kinds: list[PiiKind], redact: bool) -> tuple[list[str | None], dict[int, dict[str, int]]]:
    """Find (and optionally replace with [KIND]) PII in a column.

    Returns the column and, for rows with PII, how many matches of each kind. One pass of Arrow's RE2
    over the whole column finds the rows that may hold PII (usually few); only those take the Python
    path that runs each kind's checksum and does the replacing.
    """
    import pyarrow as pa
    import pyarrow.compute as pc

    combined = "|".join(f"(?:{k.pattern})" for k in kinds)
    arr = pa.array(values, type=pa.large_string())
    mask = pc.fill_null(pc.match_substring_regex(arr, pattern=combined), False).to_numpy(zero_copy_only=False)
    hits = mask.nonzero()[0]
    found: dict[int, dict[str, int]] = {}
    if len(hits) == 0:
        return values, found
    out = list(values) if redact else values
    for i in hits:
        text = values[i]
        counts: dict[str, int] = {}
        for kind in kinds:
            regex = re.compile(kind.pattern)
            if kind.valid is None:
                text, n = regex.subn(f"[{kind.name}]", text) if redact else (text, len(regex.findall(text)))
            else:
                n = sum(kind.valid(m.group(0)) for m in regex.finditer(text))
                if n and redact:
                    text = regex.sub(lambda m, k=kind: f"[{k.name}]" if k.valid(m.group(0)) else m.group(0), text)
            if n:
                counts[kind.name] = n
        if counts:
            found[int(i)] = counts
            if redact:
                out[i] = text
    return out, found


def redact_pii(text: str, kinds: Iterable[PiiKind] = PII_KINDS) -> tuple[str, int]:
    """One string: for callers outside the gate."""
    values, found = scan_pii([text], list(kinds), redact=True)
    return values[0], sum(found.get(0, {}).values())
