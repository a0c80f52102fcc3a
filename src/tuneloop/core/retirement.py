"""When an API-backed model stops answering: the provider's retirement table (``retirement`` in the config)
applied to a model id, and said the way a person reads it ("shuts down 2027-01-14, in 53 days").

A fine-tuned model retires with its base: ``ft:gpt-4o-mini-2024-07-18:acme::abc`` (OpenAI) and
``gpt-4o-mini-2024-07-18.ft-abc`` (Azure) both take the entry of ``gpt-4o-mini-2024-07-18``. No Prefect here:
the CLI, the drift monitor and the evaluation all read it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime

from tuneloop.core.config import RetirementConfig
from tuneloop.core.lineage import Lineage

PROVIDERS = ("openai", "azure")  # the providers with a table; an OpenAI-compatible endpoint has none
# What may follow a table entry used as a prefix: a dated or numbered snapshot (gpt-4o -> gpt-4o-2024-08-06) or
# Azure's fine-tune suffix (.ft-...). Not another name: gpt-4o-mini-2024-07-18 is not one of gpt-4o's models.
_SNAPSHOT_SUFFIX = re.compile(r"(-\d|\.ft-)")


def today_utc() -> date:
    """Providers announce retirement days in UTC."""
    return datetime.now(UTC).date()


def relative_days(days: int) -> str:
    """Days from today as said: 'in 53 days', 'today', '3 days ago'."""
    if days == 0:
        return "today"
    count = f"{abs(days)} day{'' if abs(days) == 1 else 's'}"
    return f"in {count}" if days > 0 else f"{count} ago"


@dataclass(frozen=True)
class Retirement:
    """When ``model`` (served by ``provider``) stops answering, by the table ``entry`` that applies to it."""

    model: str
    provider: str
    entry: str
    on: date

    def days_left(self, today: date | None = None) -> int:
        """Days until the shutdown: 0 on the day itself, negative once it is past."""
        return (self.on - (today or today_utc())).days

    def relative(self, today: date | None = None) -> str:
        """'in 53 days', 'today', '3 days ago'."""
        return relative_days(self.days_left(today))

    def describe(self, today: date | None = None) -> str:
        """'shuts down 2027-01-14, in 53 days', 'shuts down 2027-01-14, today', 'shut down 2027-01-14, 3 days ago'."""
        verb = "shut down" if self.days_left(today) < 0 else "shuts down"
        return f"{verb} {self.on.isoformat()}, {self.relative(today)}"

    def as_dict(self, today: date | None = None) -> dict[str, str | int]:
        """For JSON output and event payloads."""
        return {"model": self.model, "provider": self.provider, "entry": self.entry, "date": self.on.isoformat(),
                "days_left": self.days_left(today), "relative": self.relative(today),
                "summary": self.describe(today)}


def base_of(model: str) -> str:
    """The base of an OpenAI fine-tune id ``ft:BASE:org:suffix:id``; any other id as it is."""
    return model.split(":")[1] if model.startswith("ft:") and model.count(":") >= 1 else model


def table_entry(model: str, table: Mapping[str, date]) -> str | None:
    """The entry of ``table`` that applies to ``model``: its exact name, else the longest entry it starts with
    followed by a snapshot or fine-tune suffix, else None."""
    if model in table:
        return model
    matching = [key for key in table if model.startswith(key) and _SNAPSHOT_SUFFIX.match(model, len(key))]
    return max(matching, key=len) if matching else None


def retirement_of(model: str | None, provider: str | None, config: RetirementConfig) -> Retirement | None:
    """When ``model`` at ``provider`` (openai, azure) stops answering; None for an unknown model or a provider
    without a table (an OpenAI-compatible endpoint, a local adapter)."""
    if not model or provider not in PROVIDERS:
        return None
    table: Mapping[str, date] = getattr(config, provider)
    base = base_of(model)
    entry = table_entry(base, table)
    return Retirement(model=model, provider=provider, entry=entry, on=table[entry]) if entry else None


def version_retirement(lineage: Lineage, config: RetirementConfig,
                       default_provider: str | None = None) -> Retirement | None:
    """A registered model version's retirement, from its lineage (backend, fine-tuned and base model,
    provider); ``default_provider`` (the config's) when the version does not say. A local adapter never
    retires."""
    if not lineage.is_api_model:
        return None
    model = lineage.fine_tuned_model or lineage.base_model or None
    return retirement_of(model, lineage.openai_provider or default_provider, config)


def within_warning(retirement: Retirement | None, config: RetirementConfig, today: date | None = None) -> bool:
    """Close enough to warn wherever a person looks (``retirement.warn_days``), or past."""
    return retirement is not None and retirement.days_left(today) <= config.warn_days


def migration_due(days_left: int | None, config: RetirementConfig) -> bool:
    """Time to migrate the champion off its provider (``retirement.migrate_days``; 0 turns it off)."""
    return days_left is not None and config.migrate_days > 0 and days_left <= config.migrate_days


def training_closes_note(provider: str | None, config: RetirementConfig, today: date | None = None) -> str:
    """OpenAI's last day for new fine-tuning jobs, when the provider is OpenAI and the day is set."""
    closes = config.openai_training_closes
    if provider != "openai" or closes is None:
        return ""
    days = (closes - (today or today_utc())).days
    if days < 0:
        return f"OpenAI has taken no new fine-tuning jobs since {closes.isoformat()}"
    return f"OpenAI takes no new fine-tuning jobs from {closes.isoformat()} ({relative_days(days)})"


def champion_warning(version: str | None, retirement: Retirement, config: RetirementConfig,
                     today: date | None = None) -> str:
    """The line shown under ``tuneloop models``, in the drift report and the migration event: which champion
    stops answering when, and what to do about it."""
    note = training_closes_note(retirement.provider, config, today)
    return (f"champion v{version or '?'} ({retirement.model}, {retirement.provider}) {retirement.describe(today)}: "
            "move it to another backend before then (tuneloop run --migrate trains a local model on its answers)"
            + (f"; {note}" if note else ""))
