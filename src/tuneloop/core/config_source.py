"""The source section of the configuration: a landing folder of files, or a SQL table read by watermark.

Re-exported by ``core.config``: ``from tuneloop.core.config import SqlSource`` keeps working.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    Discriminator,
    Field,
    Tag,
    model_validator,
)

from tuneloop.core.config_base import ConfigPath, SecretUrl, Strict
from tuneloop.core.records import TuneloopError
from tuneloop.core.scrub import redact_url, scrub


class FolderSource(Strict):
    """Files dropped into a landing folder. ``landing`` unset means ``$TUNELOOP_HOME/landing``.

    A file is complete, and so collected, when its name does not end in .part/.tmp/.partial, it is not
    hidden, it was last modified at least ``min_age_seconds`` ago, and (if ``marker_suffix`` is set) a
    marker file ``<name><marker_suffix>`` exists beside it.
    """

    kind: Literal["folder"] = "folder"
    landing: ConfigPath | None = None
    patterns: list[str] = Field(default_factory=lambda: ["*.jsonl", "*.csv", "*.parquet"])
    min_age_seconds: float = Field(0.0, ge=0)
    marker_suffix: str | None = Field(None, description="e.g. '.done' or '_SUCCESS'-style markers")
    chunk_size: int = Field(50_000, ge=1)



def _lookback_amount(value: float | str) -> float:
    """A look-back as one number ('1h' -> 3600.0), so that it applies to time and numeric watermarks alike."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}
    if isinstance(value, str):
        text = value.strip().lower().replace(" ", "")
        parts = re.findall(r"(\d+(?:\.\d+)?)([smhdw])", text)
        if re.fullmatch(r"\d+(?:\.\d+)?", text):
            value = float(text)
        elif parts and "".join(n + u for n, u in parts) == text:
            value = sum(float(n) * units[u] for n, u in parts)
        else:
            raise ValueError(f"{value!r} is not a look-back: write a duration such as '1h', '30m', '2d', '1h30m' or a number")
    if value < 0:
        raise ValueError("a look-back cannot be negative (0 re-reads only rows at the watermark itself)")
    return float(value)



class SqlSource(Strict):
    """Rows of a table or query through SQLAlchemy, taken incrementally by a watermark column.

    Each run reads the rows past the stored watermark and, again, those within ``lookback`` of it: a row
    committed late with an older or equal watermark value is still collected. Rows read again whose id and
    content (every column but the watermark) were already consumed are skipped; a changed one is an update.
    """

    kind: Literal["sql"] = "sql"
    url: SecretUrl = Field(description="SQLAlchemy URL, e.g. sqlite:///data.db or postgresql+psycopg://user:${DB_PASSWORD}"
                           "@host/db (${VAR} is read from the environment when connecting; postgresql+psycopg needs "
                           "pip install 'tuneloop[postgres]')")
    table: str | None = None
    query: str | None = Field(None, description="a SELECT; wrapped as a subquery and filtered by watermark")
    watermark: str = "updated_at"
    lookback: Annotated[float | str, AfterValidator(_lookback_amount)] = Field(
        3600.0, description="how far behind the stored watermark each run reads again, for rows committed late "
        "with a watermark value equal to or older than the newest already seen; rows read again whose id and "
        "content were consumed are skipped, changed ones are collected as updates. A duration ('1h', '30m', '2d') "
        "or a number: seconds for date/time columns, the column's own units for numeric ones (a duration counts "
        "as seconds there: right for epoch seconds; a sequence id re-reads its last 3600 values by default). "
        "0 re-reads only the rows at the watermark itself. Default: 1h")
    chunk_size: int = Field(50_000, ge=1)

    @model_validator(mode="after")
    def _one_of_table_or_query(self):
        if (self.table is None) == (self.query is None):
            raise ValueError("set exactly one of source.table and source.query")
        return self

    def driver_problem(self) -> str | None:
        """Why this URL cannot connect from this Python (unknown dialect, driver not installed), before trying."""
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError

        shown = redact_url(self.url)
        try:
            make_url(os.path.expandvars(self.url)).get_dialect().import_dbapi()
        except ArgumentError as exc:  # NoSuchModuleError too: a dialect SQLAlchemy does not know
            return f"source.url {shown}: not a usable SQLAlchemy URL ({scrub(str(exc).splitlines()[0])})"
        except ImportError as exc:
            return (f"source.url {shown}: its database driver {exc.name or ''} is not installed"
                    f"{'' if exc.name else ' (' + scrub(str(exc).splitlines()[0]) + ')'}: {driver_hint(exc.name)}")
        return None

    def require_driver(self) -> None:
        """Raise the driver problem as one line (a TuneloopError), not an ImportError's traceback."""
        problem = self.driver_problem()
        if problem:
            raise TuneloopError(problem)



def driver_hint(module: str | None) -> str:
    """What to install for a missing database driver."""
    if module == "psycopg":
        return "pip install 'tuneloop[postgres]'"
    if module == "psycopg2":
        return "write the URL as postgresql+psycopg://... and pip install 'tuneloop[postgres]' (or pip install psycopg2-binary)"
    return f"install the package that provides the {module!r} module" if module else "install the dialect's driver"



def file_digest(path: Path) -> str:
    """sha256 of a file's content (first 16 hex digits), or its name when it cannot be read."""
    from tuneloop.core.state import sha256_file

    try:
        return "sha256:" + sha256_file(path)[:16]
    except OSError:
        return f"missing:{path.name}"



def _source_kind(value: Any) -> str:
    return (value.get("kind") if isinstance(value, dict) else getattr(value, "kind", None)) or "folder"



SourceConfig = Annotated[
    Annotated[FolderSource, Tag("folder")] | Annotated[SqlSource, Tag("sql")], Discriminator(_source_kind)
]
