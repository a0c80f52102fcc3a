"""A real public text dataset, assembled offline: the docstrings of Python's own standard library.

Every Debian machine that runs tuneloop carries it (the running interpreter's stdlib sources, PSF licence),
and tuneloop never saw it. The sources are read with ``ast`` (nothing is imported, so nothing runs). Two tasks
come out of it, each a JSONL file of records in the stdlib's own terms:

* classification: which of ten stdlib packages a public function or class belongs to, from its docstring
  (``package``, 10 labels of uneven size);
* generation: the docstring's one-line summary from the rest of it (``summary`` from ``details``).

    python data/generate_docstrings.py --out docstrings.jsonl

The same interpreter version gives the same file (913 records from CPython 3.11.7). ``tuneloop init`` holds
out its evaluation set from it, as it would from a user's own export.
"""

from __future__ import annotations

import argparse
import ast
import json
import sysconfig
from pathlib import Path

PACKAGES = {"asyncio": "asyncio", "email": "email", "xml": "xml", "turtle": "turtle", "_pydecimal": "decimal",
            "logging": "logging", "importlib": "importlib", "http": "http", "inspect": "inspect",
            "unittest": "unittest"}
SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "tkinter", "turtledemo", "ensurepip"}
MIN_CHARS = 120


def docstrings(stdlib: Path) -> list[dict]:
    records = []
    for path in sorted(stdlib.rglob("*.py")):
        rel = path.relative_to(stdlib)
        if any(p in SKIP_PARTS or p.startswith("test") for p in rel.parts):
            continue
        package = PACKAGES.get(rel.parts[0].removesuffix(".py"))
        if package is None:
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) or node.name.startswith("_"):
                continue
            doc = ast.get_docstring(node)
            if not doc or len(doc) < MIN_CHARS:
                continue
            summary, _, details = doc.partition("\n\n")
            summary, details = " ".join(summary.split()), details.strip()
            records.append({"doc_id": f"{rel.as_posix()}:{node.lineno}:{node.name}", "package": package,
                            "name": node.name, "docstring": doc, "summary": summary, "details": details})
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("docstrings.jsonl"))
    args = parser.parse_args()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    records = docstrings(stdlib)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    print(f"{len(records)} docstrings from {stdlib} in {args.out}")


if __name__ == "__main__":
    main()
