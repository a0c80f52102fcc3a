"""Scrubbing: secrets taken out of text bound for messages, log rows, events and stored parameters.

A secret is a password in a URL (``user:password@`` or a password/token query parameter), an API key
(``sk-...``, ``Bearer ...``), the token path of a Slack, Teams or Discord webhook, and any value registered
at run time with ``register`` (a password written in a config, the API key read from the environment, the
webhook URL given to ``tuneloop notify``). A reference to an environment variable (``${DB_PASSWORD}``) only
names a secret and is kept, so a redacted URL still says where its password comes from.

``install_log_scrubber`` puts a filter on Prefect's and tuneloop's loggers (and their handlers) that scrubs
every record before a handler sees it: the backstop for a message that was not scrubbed where it was made.
"""

from __future__ import annotations

import logging
import os
import re
from urllib.parse import unquote

REDACTED = "***"

_known: set[str] = set()

_REFERENCE = re.compile(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?|\*+")  # ${VAR}, $VAR, or already redacted
# scheme://user:password@ -- the password runs to the token's last @ (an unencoded @ in it stays hidden)
_URL_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s:/?#@'\"]*:)(?P<secret>[^\s'\"]*)(?=@)")
_QUERY_SECRET = re.compile(
    r"(?i)(?P<head>[?&;](?:password|passwd|pwd|pass|secret|client_secret|token|access_token|auth_token|"
    r"api[-_]?key|apikey|key|sig|signature)=)(?P<secret>[^&#\s'\"]+)")
_WEBHOOK_PATH = re.compile(
    r"(?i)(?P<head>\bhooks\.slack\.com/(?:services|workflows|triggers)/|\bdiscord(?:app)?\.com/api/webhooks/|"
    r"\.webhook\.office\.com/webhookb2/)(?P<secret>[^\s'\"?#]+)")
_API_KEY = re.compile(r"\bsk-[A-Za-z0-9_\-*]{8,}")
_BEARER = re.compile(r"(?i)\b(?P<head>bearer\s+)(?P<secret>[A-Za-z0-9._~+/\-]{8,}=*)")


def register(*secrets: str | None) -> None:
    """Values scrubbed from every later message of this process (short ones would mangle ordinary text)."""
    for secret in secrets:
        if secret and len(secret) >= 4 and not _REFERENCE.fullmatch(secret):
            _known.add(secret)
            _known.add(unquote(secret))  # as a driver would echo a percent-encoded password


def _hide(match: re.Match) -> str:
    secret = match.group("secret")
    return match.group("head") + (secret if _REFERENCE.fullmatch(secret) else REDACTED)


def _patterns(text: str) -> str:
    text = _URL_PASSWORD.sub(_hide, text)
    text = _QUERY_SECRET.sub(_hide, text)
    text = _WEBHOOK_PATH.sub(_hide, text)
    text = _BEARER.sub(_hide, text)
    return _API_KEY.sub("sk-***", text)


def scrub(text: str, *secrets: str | None) -> str:
    """``text`` with the registered secrets, ``secrets`` and anything that looks like one replaced by ***."""
    for secret in sorted({*_known, *(s for s in secrets if s)}, key=len, reverse=True):
        text = text.replace(secret, REDACTED)
    return _patterns(text)


def redact_url(url: str) -> str:
    """A URL as it may be stored or shown: its password and tokens hidden, a ${VAR} reference kept. By its
    shape only, not by what this process registered: the same config dumps (and hashes) the same everywhere."""
    return _patterns(url)


def url_secrets(url: str | None) -> list[str]:
    """The literal secrets a URL carries (its password, password-like query values), to ``register``."""
    if not url:
        return []
    found = [m.group("secret") for pattern in (_URL_PASSWORD, _QUERY_SECRET, _WEBHOOK_PATH)
             for m in pattern.finditer(url)]
    return [s for s in found if not _REFERENCE.fullmatch(s)]


class ScrubFilter(logging.Filter):
    """Scrubs a record's message, traceback and stack in place; never drops a record."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: let logging report it as it would
            return True
        clean = scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = scrub(record.exc_text)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info)
        return True


# Where run logs start (Prefect sends these two to its API, so to its database) and tuneloop's own.
LOGGERS = ("prefect", "prefect.flow_runs", "prefect.task_runs", "prefect.flow_engine", "prefect.task_engine",
           "tuneloop", "tuneloop.watch")
_FILTER = ScrubFilter()


def install_log_scrubber() -> None:
    """Put the filter on Prefect's and tuneloop's loggers and on the handlers they (and the root) have now.

    Logger filters survive Prefect's logging setup (dictConfig replaces handlers, not filters); handler filters
    also catch records that propagate from child loggers. Idempotent."""
    loggers = [logging.getLogger(name) for name in LOGGERS]
    for target in [*loggers, *(h for lg in [logging.getLogger(), *loggers] for h in lg.handlers)]:
        if _FILTER not in target.filters:
            target.addFilter(_FILTER)


def redacted_url(url: str) -> str:
    """The URL without its password, for logs, artifacts and MLflow."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(os.path.expandvars(url)).render_as_string(hide_password=True)
    except ArgumentError:
        return "<unparsable SQLAlchemy URL>"
