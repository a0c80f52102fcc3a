"""Layers point down: core <- tasks <- flows <- app, and core never imports Prefect.

Every import statement of every module counts, the ones inside functions too (a lazy import is still a
dependency). The package's folders come from pyproject's package-dir mapping, so a new part is checked
as soon as it is installed. Run ``pytest tests/test_layers.py -v -s`` to see the import table.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import ROOT

LAYERS = ["tuneloop.core", "tuneloop.tasks", "tuneloop.flows", "tuneloop.app"]  # bottom to top
FORBIDDEN_IN_CORE = ("prefect", "great_expectations")  # a service loading the champion needs neither


def package_modules() -> dict[str, Path]:
    """Every module of the installed package, by dotted name, from pyproject's package-dir mapping."""
    setup = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    modules = {}
    mapped = setup["package-dir"]
    for package in setup["packages"]:
        parent = max((p for p in mapped if package == p or package.startswith(p + ".")), key=len)
        folder = ROOT / mapped[parent] / package[len(parent):].lstrip(".").replace(".", "/")
        for path in folder.glob("*.py"):
            name = package if path.stem == "__init__" else f"{package}.{path.stem}"
            modules[name] = path
    return modules


def imports_of(path: Path, module: str) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = module.rsplit(".", node.level)[0]
                found.add(f"{base}.{node.module}" if node.module else base)
            else:
                found.add(node.module)
    return found


def layer_of(name: str) -> int | None:
    return next((i for i, layer in enumerate(LAYERS) if name == layer or name.startswith(layer + ".")), None)


def violations() -> list[str]:
    found = []
    for module, path in sorted(package_modules().items()):
        own = layer_of(module)
        if own is None:
            continue
        for target in sorted(imports_of(path, module)):
            other = layer_of(target)
            if other is not None and other > own:
                found.append(f"{module} ({LAYERS[own]}) imports {target} ({LAYERS[other]}), a higher layer")
            if own == 0 and target.split(".")[0] in FORBIDDEN_IN_CORE:
                found.append(f"{module} (core) imports {target}")
    return found


def test_every_module_of_the_package_is_in_a_layer():
    modules = package_modules()
    assert len(modules) >= 48  # 46, then tasks.profile and app.init (tuneloop init)
    entry_and_data = ("tuneloop", "tuneloop.__main__", "tuneloop.expectations", "tuneloop.deployments")
    outside = [m for m in modules if layer_of(m) is None and m not in entry_and_data]
    assert not outside, outside


def test_no_module_imports_a_higher_layer_and_core_imports_no_prefect():
    for layer in LAYERS:
        members = sorted(m for m in package_modules() if layer_of(m) == LAYERS.index(layer))
        print(f"{layer}: {len(members)} modules")
    found = violations()
    assert not found, "\n".join(found)


def test_the_walker_sees_lazy_and_relative_imports(tmp_path):
    """The check itself can fail: an import inside a function, and a relative one, are both found."""
    path = tmp_path / "m.py"
    path.write_text("def f():\n    from prefect import flow\n    from ..tasks import quality\n")
    assert imports_of(path, "tuneloop.core.m") == {"prefect", "tuneloop.tasks"}
    assert layer_of("tuneloop.tasks") > layer_of("tuneloop.core.m")


def test_loading_the_serving_model_imports_no_prefect():
    """What a service does to answer with the champion: import the pyfunc's module, nothing of the pipeline."""
    code = ("import sys, tuneloop.core.serving, mlflow.pyfunc\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('prefect', 'great_expectations')"
            " or m.startswith(('tuneloop.tasks', 'tuneloop.flows', 'tuneloop.app'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
