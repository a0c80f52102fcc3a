"""Nothing leaked: a password, an API key or a webhook token never reaches Prefect's database, MLflow's store,
the state folder or a message.

The honest tests run the real thing (the CLI in a subprocess with its own PREFECT_HOME and TUNELOOP_HOME, a
real Prefect server for notifications) and then search the bytes of every file it left: every table of
Prefect's SQLite database (flow run parameters, logs, events, artifacts, block documents), MLflow's store, the
state folder. A SQLite file stands in for a database server: a small SQLAlchemy dialect, registered in the
subprocess through a sitecustomize module, takes ``user:password@`` in the URL as PostgreSQL's would, and
refuses to connect unless the real password reached it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

from conftest import DEMO, DEMO_CONFIG, ROOT

TUNELOOP = str(Path(sys.executable).parent / "tuneloop")
PASSWORD = "Pw7qZxK2mLr9vT"  # no character JSON, YAML or a URL would escape: a byte search finds every copy
API_KEY = "sk-proj-Xq81LmZ0aBcDeFgHiJkLmN0p"
TOKEN = "T0KENx9ZqLw3Rv8HsYc2"

DIALECT = '''
"""A SQLite dialect that takes user:password in its URL, as a server database would, and checks the password."""
import os

from sqlalchemy.dialects.sqlite.pysqlite import SQLiteDialect_pysqlite


class PasswordSQLite(SQLiteDialect_pysqlite):
    supports_statement_cache = True

    def create_connect_args(self, url):
        if url.password != os.environ["SQLPW_EXPECTED"]:
            raise RuntimeError("the engine was not given the real password")
        return super().create_connect_args(url._replace(username=None, password=None))
'''

SITECUSTOMIZE = '''
import os
import sys

from sqlalchemy.dialects import registry

registry.register("sqlite.pw", "sqlpw", "PasswordSQLite")
for name in filter(None, os.environ.get("BLOCK_MODULES", "").split(",")):
    sys.modules[name] = None  # import fails with ModuleNotFoundError, as when the package is not installed
'''


def site_dir(tmp_path: Path) -> Path:
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    (site / "sqlpw.py").write_text(DIALECT)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return site


def cli(tmp_path: Path, *args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """``tuneloop ARGS`` with its own state folder, Prefect home (its own temporary server and database) and
    working directory, all under tmp_path/out."""
    out = tmp_path / "out"
    (out / "work").mkdir(parents=True, exist_ok=True)
    base = {k: v for k, v in os.environ.items()
            if k not in ("PREFECT_API_URL", "PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_LOCAL_STORAGE_PATH")}
    full = {**base, "TUNELOOP_HOME": str(out / "home"), "PREFECT_HOME": str(out / "prefect"),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(site_dir(tmp_path)), os.environ.get("PYTHONPATH")])),
            "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([TUNELOOP, *args], env=full, cwd=out / "work", capture_output=True, text=True,
                          timeout=timeout)


def files_holding(folder: Path, secret: str) -> list[str]:
    """Every file under ``folder`` whose bytes contain ``secret`` (as written, or percent- or JSON-escaped)."""
    forms = {secret.encode(), json.dumps(secret)[1:-1].encode()}
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*")
                  if p.is_file() and any(f in p.read_bytes() for f in forms))


def sql_config(folder: Path, url: str) -> Path:
    """The demo pipeline reading its tickets from a table at ``url``."""
    cfg = yaml.safe_load(DEMO_CONFIG.read_text())
    cfg["source"] = {"kind": "sql", "url": url, "table": "tickets", "watermark": "updated_at"}
    cfg["quality"]["suite"] = str(ROOT / "expectations" / "raw_records.json")
    cfg["train"]["tiny"]["corpus"] = [str(DEMO / "tickets.jsonl")]
    cfg["evaluate"]["holdout"] = str(DEMO / "holdout.jsonl")
    path = folder / "tuneloop.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def tickets_db(path: Path, n: int = 150) -> Path:
    rows = [json.loads(line) for line in (DEMO / "tickets.jsonl").read_text().splitlines()[:n]]
    cols = [*rows[0], "updated_at"]
    with sqlite3.connect(path) as con:
        con.execute(f"CREATE TABLE tickets ({', '.join(f'{c} TEXT' for c in cols)})")
        con.executemany(f"INSERT INTO tickets VALUES ({', '.join('?' * len(cols))})",
                        [[r[c] for c in cols[:-1]] + [r["created_at"]] for r in rows])
    return path


def flow_run_parameters(prefect_home: Path) -> list[str]:
    with sqlite3.connect(prefect_home / "prefect.db") as con:
        return [row[0] for row in con.execute("SELECT parameters FROM flow_run")]


# ---- 13: the SQL source's password is not a flow run parameter ----------------------------------------


def test_a_sql_password_is_kept_by_the_config_and_hidden_in_every_json_dump(monkeypatch):
    """What Prefect stores as the flow's parameters is the config dumped to JSON: the password is *** there,
    while the object the flow runs with keeps it (the engine must connect)."""
    from tuneloop.core.config import load_config
    from tuneloop.flows.drift import drift_monitor
    from tuneloop.flows.retrain import retrain

    url = f"postgresql+psycopg://svc:{PASSWORD}@db.internal:5432/crm"
    cfg = load_config(DEMO_CONFIG, [f"source={{kind: sql, url: '{url}', table: tickets}}"])
    assert cfg.source.url == url  # what collect connects with
    for stored in (retrain.serialize_parameters({"config": cfg}), drift_monitor.serialize_parameters({"config": cfg}),
                   cfg.model_dump(mode="json"), cfg.model_dump_json()):
        text = json.dumps(stored) if not isinstance(stored, str) else stored
        assert PASSWORD not in text and "postgresql+psycopg://svc:***@db.internal:5432/crm" in text
    other = load_config(DEMO_CONFIG, [f"source={{kind: sql, url: '{url.replace(PASSWORD, 'another')}', table: tickets}}"])
    assert other.config_hash() == cfg.config_hash()  # a hash of the password is not kept either
    # a reference names the secret without holding it: kept, so the stored copy still says where it comes from
    monkeypatch.setenv("DB_PASSWORD", PASSWORD)
    ref = load_config(DEMO_CONFIG, ["source={kind: sql, url: 'postgresql+psycopg://svc:${DB_PASSWORD}@db/crm', table: t}"])
    assert "svc:${DB_PASSWORD}@db/crm" in ref.model_dump_json()
    # a token in another URL of the config (an MLflow server, an API endpoint) is hidden too
    tok = load_config(DEMO_CONFIG, [f"register.tracking_uri=https://ml:{PASSWORD}@mlflow.internal",
                                    f"train.openai.base_url=https://llm.internal/v1?api_key={PASSWORD}"])
    assert PASSWORD not in tok.model_dump_json() and tok.registry.tracking_uri.endswith(f"{PASSWORD}@mlflow.internal")


@pytest.mark.slow
def test_tuneloop_run_on_a_sql_source_with_a_password_stores_it_nowhere(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    db = tickets_db(inputs / "crm.db")
    config = sql_config(inputs, f"sqlite+pw://svc:{PASSWORD}@/{db}")
    done = cli(tmp_path, "run", "--config", str(config), "--set", "train.local.max_steps=3",
               "--set", "evaluate.max_examples=20", env={"SQLPW_EXPECTED": PASSWORD})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "read 150 = accepted 150" in done.stdout and "Registered lumenfold-support version 1" in done.stdout
    out = tmp_path / "out"
    assert (out / "prefect" / "prefect.db").is_file() and (out / "home" / "mlflow.db").is_file()
    assert files_holding(out, PASSWORD) == []  # Prefect's database, MLflow's store, the state folder, the work dir
    # the database searched is the one the run used: the retrain's parameters are there, the password hidden
    assert any(f"sqlite+pw://svc:***@/{db}" in params for params in flow_run_parameters(out / "prefect"))
    assert PASSWORD not in done.stdout + done.stderr


# ---- 14: a key pasted into api_key_env ------------------------------------------------------------------


def test_a_key_in_api_key_env_is_refused_at_load_without_being_shown(tmp_path):
    from pydantic import ValidationError

    from tuneloop.core.config import JudgeConfig, OpenAITrainConfig, PipelineConfig, load_config
    from tuneloop.core.openai_client import env_api_key
    from tuneloop.core.records import TuneloopError

    path = tmp_path / "pipeline.yaml"
    path.write_text(DEMO_CONFIG.read_text().replace("train:\n", f"train:\n  openai:\n    api_key_env: {API_KEY}\n", 1))
    for load in (lambda: load_config(path), lambda: load_config(DEMO_CONFIG, [f"train.openai.api_key_env={API_KEY}"])):
        with pytest.raises(TuneloopError) as err:
            load()
        assert "train.openai.api_key_env" in str(err.value) and "not the key itself" in str(err.value)
        assert API_KEY not in str(err.value) and API_KEY[3:12] not in str(err.value)
    # pydantic's own message (Prefect prints it when it validates a flow's parameters) does not echo it either
    for build in (lambda: PipelineConfig.model_validate({"evaluate": {"holdout": "h.jsonl"},
                                                         "train": {"openai": {"api_key_env": API_KEY}}}),
                  lambda: JudgeConfig(model="judge", api_key_env=API_KEY),
                  lambda: OpenAITrainConfig(api_key_env="a3f9c2d18b7e4f6a9c0d2e4f6a8b0c1d"),  # an Azure key's shape
                  lambda: OpenAITrainConfig(api_key_secret_block=API_KEY)):
        with pytest.raises(ValidationError) as err:
            build()
        assert API_KEY not in str(err.value) and "a3f9c2d18b7e" not in str(err.value)
    assert OpenAITrainConfig(api_key_env="AZURE_OPENAI_API_KEY").api_key_env == "AZURE_OPENAI_API_KEY"
    assert JudgeConfig(model="judge", api_key_env="judge_key2").api_key_env == "judge_key2"
    # a config built around validation: the "set the variable ..." message is scrubbed all the same
    with pytest.raises(TuneloopError) as err:
        env_api_key(OpenAITrainConfig.model_construct(api_key_env=API_KEY))
    assert API_KEY not in str(err.value) and "no API key" in str(err.value)


def test_tuneloop_run_with_a_key_in_api_key_env_stops_before_prefect_or_a_log_sees_it(tmp_path):
    home = tmp_path / "out" / "home"
    (home / "landing").mkdir(parents=True)
    (home / "landing" / "t.jsonl").write_bytes((DEMO / "tickets.jsonl").read_bytes())
    done = cli(tmp_path, "run", "--config", str(DEMO_CONFIG), "--set", "train.backend=openai",
               "--set", f"train.openai.api_key_env={API_KEY}")
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "train.openai.api_key_env" in done.stderr and "Traceback" not in done.stderr
    assert API_KEY not in done.stdout + done.stderr
    assert files_holding(tmp_path / "out", API_KEY) == []
    assert not (tmp_path / "out" / "prefect" / "prefect.db").exists()  # refused before any flow run


# ---- every log row: the filter on Prefect's and tuneloop's loggers ------------------------------------


@pytest.mark.slow
def test_run_logs_reach_prefects_database_scrubbed(prefect_harness):
    """A message that was not scrubbed where it was made (a library's error, a stray f-string) is scrubbed on
    its way to Prefect's log table, traceback included, once a config has been loaded in the process."""
    from prefect import flow, get_run_logger, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogHandler

    from tuneloop.core.config import load_config

    url = f"postgresql+psycopg://svc:{PASSWORD}@db.internal/crm"
    load_config(DEMO_CONFIG)

    @task
    def connect() -> None:
        log = get_run_logger()
        log.warning("task: connecting to %s", url)
        try:
            raise ConnectionError(f"cannot reach {url} (key {API_KEY})")
        except ConnectionError:
            log.exception("task: connection failed")

    @flow(name="leaky")
    def leaky() -> None:
        get_run_logger().info(f"flow: source {url}, webhook https://hooks.slack.com/services/T01/B02/{TOKEN}")
        connect()

    state = leaky(return_state=True)
    APILogHandler().flush()
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
    text = "\n".join(row.message for row in logs)
    assert "flow: source postgresql+psycopg://svc:***@db.internal/crm" in text, text
    assert "task: connecting to postgresql+psycopg://svc:***@db.internal/crm" in text
    assert "ConnectionError: cannot reach postgresql+psycopg://svc:***@db.internal/crm (key sk-***)" in text
    assert PASSWORD not in text and API_KEY not in text and TOKEN not in text


# ---- 15: the webhook token -----------------------------------------------------------------------------


@pytest.mark.slow
def test_notify_keeps_the_webhook_token_out_of_prefects_database(tmp_path):
    """`tuneloop notify` against a real server; a promotion is posted to the webhook (the real URL still works),
    then no file of the server (its database: events, block documents; its home, its log) holds the token."""
    import http.server
    import threading

    from prefect.events import emit_event
    from services import PrefectServer, wait_until

    paths: list[str] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            self.rfile.read(int(self.headers["Content-Length"]))
            paths.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    receiver = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    server = PrefectServer(tmp_path / "prefect")
    try:
        server.start()
        url = f"http://127.0.0.1:{receiver.server_address[1]}/services/T01/B02/{TOKEN}"
        done = subprocess.run([TUNELOOP, "notify", "--webhook", url], env={**server.env, "TUNELOOP_HOME": str(tmp_path)},
                              capture_output=True, text=True, cwd=ROOT, timeout=180)
        assert done.returncode == 0, done.stderr
        assert TOKEN not in done.stdout + done.stderr
        with server.client_settings():
            emit_event("tuneloop.model.promoted",
                       resource={"prefect.resource.id": "tuneloop.model.lumenfold-support",
                                 "prefect.resource.name": "lumenfold-support"},
                       payload={"version": "3", "summary": "lumenfold-support version 3 promoted"})
        wait_until(lambda: paths, 90, "the promotion at the webhook")
    finally:
        server.stop()
        receiver.shutdown()
    assert paths == [f"/services/T01/B02/{TOKEN}"]
    root = tmp_path / "prefect"
    assert files_holding(root, "tuneloop-notify")  # the block and its events are in the files searched
    assert files_holding(root, TOKEN) == []


# ---- 16: a missing database driver --------------------------------------------------------------------


def test_postgres_driver_is_an_optional_extra():
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("psycopg[binary]") for req in extras["postgres"])


def test_a_missing_driver_is_one_preflight_line_naming_the_extra(tmp_path, monkeypatch):
    from tuneloop.core.config import load_config
    from tuneloop.core.records import TuneloopError
    from tuneloop.lib.ledger import Ledger
    from tuneloop.lib.sources import SqlTable
    from tuneloop.tasks.preflight import preflight

    monkeypatch.setitem(sys.modules, "psycopg", None)  # as when it is not installed, whatever this venv holds
    url = f"postgresql+psycopg://svc:{PASSWORD}@127.0.0.1:1/crm"
    cfg = load_config(DEMO_CONFIG, [f"source={{kind: sql, url: '{url}', table: tickets}}"])
    (problem,) = preflight(cfg)
    assert problem == ("source.url postgresql+psycopg://svc:***@127.0.0.1:1/crm: its database driver psycopg is not "
                       "installed: pip install 'tuneloop[postgres]'")
    with pytest.raises(TuneloopError, match=r"pip install 'tuneloop\[postgres\]'"):  # not a ModuleNotFoundError
        SqlTable(cfg.source).collect(Ledger())
    unknown = load_config(DEMO_CONFIG, ["source={kind: sql, url: 'postgresq://svc@db/crm', table: tickets}"])
    assert preflight(unknown)[0].startswith("source.url postgresq://svc@db/crm: not a usable SQLAlchemy URL")


def test_tuneloop_run_with_a_missing_driver_exits_2_with_one_line_before_any_work(tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    config = sql_config(inputs, f"postgresql+psycopg://svc:{PASSWORD}@127.0.0.1:1/crm")
    done = cli(tmp_path, "run", "--config", str(config), env={"BLOCK_MODULES": "psycopg"})
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    assert "Traceback" not in done.stderr and "ModuleNotFoundError" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: {config}: source.url postgresql+psycopg://svc:***@127.0.0.1:1/crm: its database "
                      "driver psycopg is not installed: pip install 'tuneloop[postgres]'"], done.stderr
    assert PASSWORD not in done.stdout + done.stderr
    out = tmp_path / "out"
    assert not (out / "prefect" / "prefect.db").exists()  # no flow run began
    assert not any((out / "home" / "runs").glob("*")) and not any((out / "home" / "datasets").glob("*"))
