"""Layers point down: core <- lib <- tasks <- flows <- app; core never imports Prefect; no stage imports
another stage; and no module imports itself back through others (no import cycles).

Every import statement of every module counts, the ones inside functions too (a lazy import is still a
dependency). The package's folders come from pyproject's package-dir mapping, so a new part is checked
as soon as it is installed. A failure names each offending import as ``file:line: statement``. Run
``pytest tests/test_layers.py -v -s`` to see the import table.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

from conftest import ROOT

LAYERS = ["tuneloop.core", "tuneloop.lib", "tuneloop.tasks", "tuneloop.flows", "tuneloop.app"]  # bottom to top
STAGES = "tuneloop.tasks"  # one module per stage: a stage composes support code (core, lib), never another stage
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


def import_statements(path: Path, module: str, known: set[str]) -> list[tuple[str, int, str]]:
    """(imported module of the package, line, the statement as written): ``from tuneloop.lib import tokens``
    names ``tuneloop.lib.tokens``, not only the package."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = module.rsplit(".", node.level)[0]
                base = f"{parent}.{base}" if base else parent
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        text = ast.unparse(node)
        for target in dict.fromkeys(targets):
            while target and target not in known and "." in target:  # import a.b.c -> module a.b
                target = target.rsplit(".", 1)[0]
            if target in known and target != module:
                found.append((target, node.lineno, text))
    return found


def where(path: Path, line: int, text: str) -> str:
    shown = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name
    return f"{shown}:{line}: {text}"


def stage_to_stage_imports(modules: dict[str, Path]) -> list[str]:
    found = []
    for module, path in sorted(modules.items()):
        if not module.startswith(STAGES + "."):
            continue
        for target, line, text in import_statements(path, module, set(modules)):
            if target.startswith(STAGES + "."):
                found.append(f"stage {module} imports stage {target}: {where(path, line, text)} "
                             "(move what both need to tuneloop.lib or tuneloop.core; a flow composes stages)")
    return found


def import_cycles(modules: dict[str, Path]) -> list[str]:
    """Each cycle once, as the chain of imports that closes it."""
    known = set(modules)
    edges = {m: {} for m in modules}
    for module, path in modules.items():
        for target, line, text in import_statements(path, module, known):
            edges[module].setdefault(target, where(path, line, text))
    cycles, seen, done = [], set(), set()

    def visit(module: str, stack: list[str]) -> None:
        seen.add(module)
        stack.append(module)
        for target in sorted(edges[module]):
            if target in stack:
                loop = stack[stack.index(target):] + [target]
                key = frozenset(loop)
                if key not in done:
                    done.add(key)
                    cycles.append("import cycle " + " -> ".join(loop) + ":\n" + "\n".join(
                        f"    {edges[a][b]}" for a, b in zip(loop, loop[1:], strict=False)))
            elif target not in seen:
                visit(target, stack)
        stack.pop()

    for module in sorted(modules):
        if module not in seen:
            visit(module, [])
    return cycles


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
    assert len(modules) >= 60  # 48, then the lib layer's own modules (registry, datasets, gate, ...)
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


def test_no_stage_imports_another_stage():
    found = stage_to_stage_imports(package_modules())
    assert not found, "\n".join(found)


def test_there_are_no_import_cycles():
    found = import_cycles(package_modules())
    assert not found, "\n".join(found)


def test_a_stage_importing_a_stage_or_a_cycle_fails_with_the_offending_import(tmp_path):
    """The new rules can fail, and say where: a stage that imports another stage, and the cycle it closes."""
    probe, back = tmp_path / "probe.py", tmp_path / "probe_back.py"
    probe.write_text('"""probe"""\n\n\ndef f():\n    from tuneloop.tasks.register import register_task\n')
    back.write_text("from tuneloop.tasks import probe\n")
    modules = {**package_modules(), "tuneloop.tasks.probe": probe, "tuneloop.tasks.probe_back": back}
    assert stage_to_stage_imports(modules)[0].startswith(
        "stage tuneloop.tasks.probe imports stage tuneloop.tasks.register: "
        "probe.py:5: from tuneloop.tasks.register import register_task (move what both need")
    probe.write_text("from tuneloop.tasks import probe_back\n")
    assert import_cycles(modules) == [
        "import cycle tuneloop.tasks.probe -> tuneloop.tasks.probe_back -> tuneloop.tasks.probe:\n"
        "    probe.py:1: from tuneloop.tasks import probe_back\n"
        "    probe_back.py:1: from tuneloop.tasks import probe"]


MAX_MODULE_LINES = 500  # past this a module holds several jobs: split it by job, not by line count


def test_no_module_of_the_package_is_over_500_lines():
    sizes = {module: len(path.read_text().splitlines()) for module, path in package_modules().items()}
    over = sorted(f"{module}: {n} lines" for module, n in sizes.items() if n > MAX_MODULE_LINES)
    assert not over, "\n".join(over)
