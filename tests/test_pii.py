"""Phone numbers are found by libphonenumber's rules, not by a regex that also takes IP addresses, amounts,
dates and ids (issue 16: ``200.49.219.180`` became ``200.[PHONE]``)."""

import phonenumbers
import pyarrow as pa
import pyarrow.compute as pc
import pytest

from tuneloop.core.pii import PII_KINDS, find_phones, phone_kind, redact_pii, scan_pii
from tuneloop.core.records import TuneloopError

PHONE = next(k for k in PII_KINDS if k.name == "PHONE")


@pytest.mark.parametrize("text", [
    # the old regex redacted these
    "server 200.49.219.180 is down",
    "from 10.0.0.1 and 192.168.100.200",
    "total EUR 12.345.678,90",
    "paid 12 345 678 RUB",
    "invoice INV-2026-1122-0042 is open",
    "order ORD 2024-118-833 shipped",          # a valid US number's digits, not grouped as one
    "serial 123 4567 89012",
    "tracking 1Z 999 AA1 01 2345 6784",
    "release 2024.1122.0930",
    "ISBN 978 030 640 6157",
    "logged 2026.11.22 10:31:05.123 456",
    # the old regex left these alone; kept so that they stay so (leniency POSSIBLE would take the ORD- id,
    # the ISBN and 1234567; dropping the id rule, #4155550132)
    "order ORD-2024-118833 shipped",
    "order #4155550132 shipped",
    "ISBN 0-306-40615-2",
    "upgraded to 3.12.1 then v2.14.0-rc1",
    "build 10.0.19045.3693",
    "due 2026-11-22, 22/11/2026 or 2026.11.22",
    "at 10:31:05 on 2026-11-22 10:31",
    "uuid 123e4567-e89b-12d3-a456-426614174000",
    "total $1,234,567.89",
    "code 1234567",
])
def test_look_alikes_are_not_phone_numbers(text):
    assert redact_pii(text) == (text, 0)
    _, found = scan_pii([text], list(PII_KINDS), redact=False)
    assert "PHONE" not in found.get(0, {})


@pytest.mark.parametrize("text,expected", [
    ("call +1 415 555 0132 now", "call [PHONE] now"),
    ("call (415) 555-0132 now", "call [PHONE] now"),           # the old regex missed this one
    ("call 415-555-0132 or 415.555.0132", "call [PHONE] or [PHONE]"),
    ("call 1-800-555-0199", "call [PHONE]"),                    # the old regex left '1-'
    ("London: +44 20 7946 0958.", "London: [PHONE]."),
    ("Berlin: +49 30 901820, or +49 30 9018 20", "Berlin: [PHONE], or [PHONE]"),  # missed, and the next 3
    ("Paris +33 1 42 68 53 00", "Paris [PHONE]"),
    ("tel:+14155550132", "tel:[PHONE]"),
    ("full width ＋４４ ２０ ７９４６ ０９５８", "full width [PHONE]"),
    ("call 415-555-0132 at 10:30 on 2026-11-22", "call [PHONE] at 10:30 on 2026-11-22"),
])
def test_phone_numbers_in_common_formats_are_redacted(text, expected):
    assert redact_pii(text)[0] == expected


def test_a_national_number_of_another_region_needs_that_region():
    """020 7946 0958 is a London number only for data from the UK: with the default (US) it stays."""
    text = "call 020 7946 0958 or (415) 555-0132 or +49 30 901820"
    assert redact_pii(text)[0] == "call 020 7946 0958 or [PHONE] or [PHONE]"
    assert redact_pii(text, [phone_kind("GB")])[0] == "call [PHONE] or (415) 555-0132 or [PHONE]"
    with pytest.raises(TuneloopError, match="phone region 'XX'"):
        phone_kind("XX")


def test_the_default_phone_kind_is_the_us_one_and_its_prefilter_length_is_libphonenumbers():
    assert min(phonenumbers.PhoneMetadata.metadata_for_region("US").general_desc.possible_length) == 10
    assert phone_kind("US").pattern == PHONE.pattern


@pytest.mark.parametrize("text", [
    "Reach me at +1 415 555 0132 or (415) 555-0133; my colleague's is +44 20 7946 0958.",
    "Invoice 4412 of 2026-11-22: $1,234.56, call 415.555.0132 before 5 pm or +49 30 901820",
    "ids 12 345 6789 0123 and 555 0199 and 4155550132 and 212 555 01 99 and +1 212 555 0199 x 12",
    "call 415-555-0132 or 415-555-0133,415 555 0134 (ext. 12) or +442079460958 +1 415 555 0135",
])
def test_looking_around_candidate_runs_finds_what_libphonenumber_finds_in_the_whole_text(text):
    """The finder shows libphonenumber a few characters around each run only: it must agree with a whole-text
    match (numbers written with + at leniency VALID, others also STRICT_GROUPING)."""
    valid = phonenumbers.PhoneNumberMatcher(text, "US", leniency=phonenumbers.Leniency.VALID)
    strict = {(m.start, m.end) for m in phonenumbers.PhoneNumberMatcher(text, "US", leniency=phonenumbers.Leniency.STRICT_GROUPING)}
    whole = [(m.start, m.end) for m in valid if m.raw_string.startswith("+") or (m.start, m.end) in strict]
    assert whole and find_phones(text) == whole


def test_the_column_prefilter_takes_every_phone_number_and_skips_short_digit_runs():
    """Rows the RE2 prefilter skips never reach libphonenumber: it must not skip a phone number."""
    texts = ["+49 30 901820", "(415) 555-0132", "1-800-555-0199", "＋４４ ２０ ７９４６ ０９５８",
             "due 2026-11-22", "v3.12.1", "$1,234.56", "code 1234567"]
    mask = pc.match_substring_regex(pa.array(texts), pattern=PHONE.pattern).to_pylist()
    assert mask == [True, True, True, True, False, False, False, False]


def test_the_configured_phone_region_is_the_one_the_gate_uses():
    from tuneloop.core.config import QualityConfig
    from tuneloop.core.pii import pii_kinds

    text = "call 020 7946 0958 or +49 30 901820"
    assert redact_pii(text, pii_kinds(QualityConfig()))[0] == "call 020 7946 0958 or [PHONE]"
    assert redact_pii(text, pii_kinds(QualityConfig(phone_region="gb")))[0] == "call [PHONE] or [PHONE]"
