"""tuneloop installed as a user installs it: a real (not editable) install of a clean copy of the repository
into a fresh virtualenv, used from inside a project that has its own `flows/` package and `tasks.py`.

The fresh virtualenv borrows the already installed dependencies (torch, prefect, ...) through a .pth line
instead of downloading 2 GB again; tuneloop itself comes only from the wheel built here (the borrowed folder's
editable hook is not run: .pth lines added that way are not processed).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from conftest import DEMO, ROOT, write_lines

pytestmark = pytest.mark.slow


def clean_copy(dest: Path) -> Path:
    """What a fresh clone holds: the tracked files (or, outside git, the tree less local state)."""
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True)
    if listed.returncode == 0 and listed.stdout:
        for name in listed.stdout.decode().split("\0"):
            if name and (ROOT / name).is_file():
                (dest / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, dest / name)
    else:
        shutil.copytree(ROOT, dest, dirs_exist_ok=True, ignore=shutil.ignore_patterns(
            ".venv", ".tuneloop*", ".git", "build", "*.egg-info", "__pycache__", "mlruns", "mlartifacts"))
    return dest


@pytest.fixture(scope="module")
def user_env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    source = clean_copy(tmp / "clone")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "borrowed-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps",
                           "--no-build-isolation", "--no-index", "--quiet", str(source)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    return venv, site


def test_the_wheel_installs_one_package_and_its_data(user_env):
    _, site = user_env
    top = sorted(p.name for p in site.iterdir() if not p.name.endswith((".dist-info", ".pth")) and p.name != "__pycache__")
    assert top == ["tuneloop"], top  # no generic top-level `flows` or `tasks`
    for part in ("core", "tasks", "flows", "app"):
        assert (site / "tuneloop" / part / "__init__.py").is_file(), part
    assert (site / "tuneloop" / "expectations" / "raw_records.json").is_file()
    assert (site / "tuneloop" / "deployments" / "demo.yaml").is_file()
    assert (site / "tuneloop" / "deployments" / "prefect.yaml").is_file()


def test_a_users_project_with_its_own_flows_and_tasks_runs_the_loop(user_env, tmp_path):
    venv, site = user_env
    project = tmp_path / "project"
    # The user's own Prefect project: a `flows` package and a `tasks.py`, first on sys.path with `python -m`.
    write_lines(project / "flows" / "__init__.py", ["raise ImportError('the user flows package was imported')"])
    write_lines(project / "tasks.py", ["raise ImportError('the user tasks module was imported')"])
    lines = (DEMO / "tickets.jsonl").read_text(encoding="utf-8").splitlines(keepends=True)
    write_lines(project / "landing" / "tickets.jsonl", lines[:800])
    write_lines(project / "holdout.jsonl", (DEMO / "holdout.jsonl").read_text().splitlines()[:20])
    config = project / "support.yaml"
    config.write_text("\n".join([
        "name: support",
        "source: {kind: folder, landing: landing}",
        "mapping: {id: ticket_id, label: queue, user: \"Subject: {subject}\\n\\n{body}\", "
        "assistant: \"queue: {queue}\\n{answer}\"}",
        "train:",
        "  base_model: tiny",
        "  tiny: {corpus: [landing/tickets.jsonl]}",
        "  local: {max_steps: 60, batch_size: 4, learning_rate: 0.003, max_length: 512}",
        "evaluate: {holdout: holdout.jsonl, label_pattern: '^\\s*queue:\\s*(\\S+)'}",
        # 60 steps of a tiny model: the installed wheel is under test, not the model, so the floors are off
        "register: {model_name: support-desk, experiment: support-desk, beat_majority: false, beat_prompted: false}",
    ]) + "\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_", "TUNELOOP_"))}
    env.update(TUNELOOP_HOME=str(project / ".tuneloop"), PYTHONPATH="")
    py = str(venv / "bin" / "python")

    def tuneloop(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([py, "-m", "tuneloop", *args], cwd=project, env=env, capture_output=True, text=True,
                              timeout=600)

    run = tuneloop("run", "--config", str(config))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "with alias champion" in run.stdout, run.stdout[-3000:]
    check = tuneloop("check", "landing/tickets.jsonl", "--config", str(config), "--json")
    assert check.returncode == 0, check.stdout[-2000:] + check.stderr[-2000:]
    models = tuneloop("models", "--config", str(config), "--json")
    assert models.returncode == 0, models.stderr[-2000:]
    rows = json.loads(models.stdout)["versions"]
    assert any("champion" in r["aliases"] for r in rows)

    # A service that only wants the champion: the pyfunc loads and answers, and no Prefect is imported.
    code = ("import sys, mlflow\n"
            f"mlflow.set_tracking_uri('sqlite:///{project / '.tuneloop' / 'mlflow.db'}')\n"
            "model = mlflow.pyfunc.load_model('models:/support-desk@champion')\n"
            "answers = model.predict(['Subject: Login loop\\n\\nThe password reset email never arrives.'])\n"
            "print(repr(answers[0][:40]), type(model._model_impl.python_model).__module__)\n"
            "print('PREFECT', sorted(m for m in sys.modules if m.split('.')[0] == 'prefect'))\n"
            "print('PIPELINE', sorted(m for m in sys.modules if m.startswith(('tuneloop.tasks', 'tuneloop.flows'))))")
    served = subprocess.run([py, "-c", code], cwd=project, env=env, capture_output=True, text=True, timeout=300)
    assert served.returncode == 0, served.stderr[-3000:]
    assert "tuneloop.core.serving" in served.stdout
    assert "PREFECT []" in served.stdout and "PIPELINE []" in served.stdout, served.stdout
    assert str(site) in subprocess.run([py, "-c", "import tuneloop; print(tuneloop.__file__)"], cwd=project, env=env,
                                       capture_output=True, text=True).stdout
