"""Personal data: found by pattern (and checksum where one exists), redacted as [KIND] or reported.

One pass of Arrow's RE2 over a whole column finds the few rows that may hold PII; only those take the
slower Python path. Phone numbers are not a regex's job: digit groups also make dates, versions, IP
addresses, amounts and ids. For them the regex only picks candidate runs of digits (long enough to be a
number of the region, or written with +), and Google's libphonenumber rules (``phonenumbers``) keep those
that are valid numbers of their country. Used by the quality gate and the held-out reader alike, so a
held-out example and its training twin are redacted the same way.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import lru_cache, partial

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
    """A kind of personal data: a regex (valid in both RE2 and Python) and an optional checksum.

    With ``find``, the regex only marks candidate texts (a superset) and ``find`` returns the spans to
    redact: for kinds that a regex cannot tell apart from look-alikes."""

    name: str
    pattern: str
    valid: Callable[[str], bool] | None = None
    find: Callable[[str], list[tuple[int, int]]] | None = None


# National numbers are found as written in this region ((415) 555-0132); numbers written with + are found
# whatever their country. NANP: the most common national format in English-language data; phone_kind(region)
# serves data from elsewhere.
PHONE_REGION = "US"
_DIGIT = "[0-9\uff10-\uff19]"  # ASCII and full-width digits (RE2's \d is ASCII only)
# libphonenumber's separators between digit groups (its _VALID_PUNCTUATION less the 'x' of hex codes)
_SEPARATOR = "[-\u2010-\u2015\u2212\u30fc\uff0d-\uff0f \u00a0\u00ad\u200b\u2060\u3000()\uff08\uff09\uff3b\uff3d.\\[\\]/~\u2053\u223c\uff5e]"
_THEN_DIGIT = f"(?:{_SEPARATOR}{{0,4}}{_DIGIT})"  # a digit after at most 4 separators
# An id that holds a valid-looking number: INV-2026-1122-0042, ORD_4155550132, #4155550132
_ID_BEFORE = re.compile(r"(?:[A-Za-z0-9][-_/]|#)\Z")
_TIME_AFTER = re.compile(r":\d")  # 2026.11.22 10:31 is a time, not 202-611-2210
# Runs never worth asking libphonenumber about (it would say no, slowly): an IPv4 address; a date and the
# hour of a time after it
_OCTET = r"(?:25[0-5]|2[0-4]\d|1?\d?\d)"
_IPV4 = re.compile(rf"{_OCTET}(?:\.{_OCTET}){{3}}")
_DATE_HOUR = re.compile(r"(?:\d{4}[-./]\d{1,2}[-./]\d{1,2}|\d{1,2}[-./]\d{1,2}[-./]\d{4})[ T]\d{1,2}")
# What libphonenumber looks at around a run: a letter or currency sign before it; after it, a ':30' time
# suffix or an extension (x 12, ext. 1234)
_BEFORE, _AFTER = 4, 24


def phone_candidates(national_digits: int) -> str:
    """Runs of digits that may be a phone number: 7+ digits after a +, or as many as the region's shortest
    national number. Cheap, in RE2 over the whole column: most dates, versions, amounts and ids fall short
    and never reach libphonenumber."""
    return f"[+\uff0b]{_SEPARATOR}{{0,2}}{_DIGIT}{_THEN_DIGIT}{{6,}}|{_DIGIT}{_THEN_DIGIT}{{{max(7, national_digits) - 1},}}"


_US_CANDIDATES = phone_candidates(10)  # libphonenumber's shortest US national number (a test checks it)


@lru_cache(maxsize=2**16)
def _valid_phones(window: str, region: str) -> tuple[tuple[int, int], ...]:
    """Numbers valid in their plan (leniency VALID); one written without + must also be grouped as the
    region writes its numbers (STRICT_GROUPING): 2024-118-833 is a valid US number's digits, not its shape."""
    import phonenumbers

    found = list(phonenumbers.PhoneNumberMatcher(window, region, leniency=phonenumbers.Leniency.VALID))
    national = [(m.start, m.end) for m in found if m.raw_string[0] not in "+\uff0b"]
    grouped = {(m.start, m.end) for m in phonenumbers.PhoneNumberMatcher(
        window, region, leniency=phonenumbers.Leniency.STRICT_GROUPING)} if national else set()
    return tuple((m.start, m.end) for m in found if (m.start, m.end) not in national or (m.start, m.end) in grouped)


def find_phones(text: str, region: str = PHONE_REGION, candidates: str = "") -> list[tuple[int, int]]:
    """Spans of valid phone numbers that are not part of an id or a time; ``candidates``: the region's
    ``phone_candidates`` (default: the US's).

    libphonenumber runs on each candidate run with a few characters around it, not on the whole text,
    whose every small number it would try to parse; the same run in the same surroundings is parsed once."""
    spans: list[tuple[int, int]] = []
    for run in re.finditer(candidates or _US_CANDIDATES, text):
        if (_IPV4.fullmatch(run.group()) or _DATE_HOUR.fullmatch(run.group()) and _TIME_AFTER.match(text, run.end())
                or _ID_BEFORE.search(text, max(0, run.start() - 2), run.start())):
            continue
        lo = max(0, run.start() - _BEFORE)
        for start, end in _valid_phones(text[lo:run.end() + _AFTER], region):
            start, end = start + lo, end + lo
            if start >= run.end() or _ID_BEFORE.search(text, max(0, start - 2), start) or _TIME_AFTER.match(text, end):
                continue
            if not spans or start >= spans[-1][1]:
                spans.append((start, end))
    return spans


def phone_kind(region: str) -> PiiKind:
    """[PHONE] for data whose national numbers are written as in ``region`` (ISO 3166, e.g. GB: 020 7946 0958)."""
    import phonenumbers

    metadata = phonenumbers.PhoneMetadata.metadata_for_region(region.upper())
    if metadata is None:
        raise TuneloopError(f"phone region {region!r}: not a region libphonenumber knows (ISO 3166 code, e.g. US, GB, DE)")
    candidates = phone_candidates(min(metadata.general_desc.possible_length))
    return PiiKind("PHONE", candidates, find=partial(find_phones, region=region.upper(), candidates=candidates))


# Order matters: a card number is also a run of digits a phone pattern would take.
PII_KINDS: tuple[PiiKind, ...] = (
    PiiKind("CARD", r"\b(?:\d[ -]?){12,18}\d\b", luhn_ok),
    PiiKind("IBAN", r"\b[A-Z]{2}\d{2}(?:[ ]?[A-Z0-9]){11,30}\b", iban_ok),
    PiiKind("EMAIL", r"[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}"),
    PiiKind("PHONE", _US_CANDIDATES, find=find_phones),  # phone_kind("US"), without importing phonenumbers
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
    kinds = list(PII_KINDS)
    if quality.phone_region.upper() != PHONE_REGION:
        kinds[-1] = phone_kind(quality.phone_region)
    return [*kinds, *extra]


def _replace(text: str, spans: list[tuple[int, int]], token: str) -> str:
    parts, last = [], 0
    for start, end in spans:
        parts += [text[last:start], token]
        last = end
    return "".join(parts) + text[last:]


def scan_pii(values: list[str | None], kinds: list[PiiKind], redact: bool) -> tuple[list[str | None], dict[int, dict[str, int]]]:
    """Find (and optionally replace with [KIND]) PII in a column.

    Returns the column and, for rows with PII, how many matches of each kind. One pass of Arrow's RE2
    over the whole column finds the rows that may hold PII (usually few); only those take the Python
    path that runs each kind's checksum or finder and does the replacing.
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
            if kind.find is not None:
                spans = kind.find(text)
                n = len(spans)
                if n and redact:
                    text = _replace(text, spans, f"[{kind.name}]")
            elif kind.valid is None:
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
