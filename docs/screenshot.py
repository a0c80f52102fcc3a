"""Screenshots of the pages a person visits after a retrain, and a check that each one shows what the state holds.

    .venv/bin/python docs/screenshot.py               # demo state in a temp folder, then the screenshots
    .venv/bin/python docs/screenshot.py --home PATH   # reuse a state folder (e.g. after `make demo`)

It builds the demo state the way `make demo` does (with fewer training steps), starts a Prefect server and
`mlflow ui` on it, then drives headless Chromium over the Chrome DevTools Protocol through the Prefect runs
list, the retrain run (graph, task runs, artifacts), the evaluation artifact, the MLflow runs list, run,
model metric charts and model version, and the Great Expectations Data Docs. Each page is saved as
docs/<page>.png. A page fails when it shows an error or an empty panel where the state has data, or logs a
console error, an uncaught exception or a failed request: Chromium may reach 127.0.0.1 only, so a page that
needs a CDN fails too. All problems are printed, one line each, and the exit status is 1.

Needs Debian's `chromium` (apt-get install chromium).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from services import BIN, PrefectServer, answers, free_port, stop_group, wait_until  # noqa: E402

# What the Makefile exports: offline and quiet.
TELEMETRY_OFF = {"DO_NOT_TRACK": "true", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "MLFLOW_DISABLE_TELEMETRY": "true",
                 "GX_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1",
                 "TOKENIZERS_PARALLELISM": "false"}
DEMO_CONFIG = ROOT / "deployments" / "demo.yaml"
SPEED = ["train.local.max_steps=30", "evaluate.max_examples=20"]
WIDTH, HEIGHT = 1440, 900
# Text an empty panel shows (Prefect and MLflow UIs); on these pages the state has the data, so it is a failure.
PREFECT_EMPTY = ["No task runs", "No flow runs", "No runs found", "did not produce any artifacts",
                 "has not yet produced artifacts", "Something went wrong"]
MLFLOW_EMPTY = ["No runs logged", "No runs match", "No metrics recorded", "No metric charts", "No metrics available",
                "No versions", "Something went wrong", "Page not found", "does not exist"]
# MLflow 3.17 opens an experiment in its GenAI view unless told otherwise; that view's sidebar has "Evaluation runs"
# where the model-training view has "Runs".
GENAI_VIEW = ("opens in the GenAI view ('Evaluation runs' in the sidebar) although the experiment trains models",
              r"/(^|\n)\s*Evaluation runs\s*(\n|$)/.test(document.body.innerText)")
# The address tuneloop prints for the MLflow UI (`make mlflow-ui`, the run summary, the promotion artifact) asks
# for model-training mode: the UI keeps GenAI / model training per browser, GenAI by default.
ML = "?workflowType=machine_learning"
# Console lines that say nothing about what the page shows: printed as ignored, with why, never silently dropped.
HARMLESS = [
    ("favicon.ico", "a tab icon the page links to but the server does not have"),
    ("/ico/undefined.svg", "the Prefect UI setting the tab icon from the run's state before the state has loaded"),
    ("/ajax-api/2.0/mlflow/users/current", "the MLflow UI asking whether basic-auth is on: 404 means it is not"),
    ("ResizeObserver loop completed with undelivered notifications", "a browser notice, not an error of the page"),
]
# Request errors that mean "no network beyond 127.0.0.1": the page needs another host (a CDN).
OFFLINE_ERRORS = ("net::ERR_PROXY_CONNECTION_FAILED", "net::ERR_NAME_NOT_RESOLVED", "net::ERR_TUNNEL_CONNECTION_FAILED",
                  "net::ERR_INTERNET_DISCONNECTED")


class ShotProblem(Exception):
    """The state or a service is not there to screenshot (not a page problem): one line for the user."""


@dataclass
class Page:
    """One page to visit: ``tab`` is clicked first, as a person would (the Prefect UI drops a ``?tab=`` it gets
    before the run has loaded); the page is loaded once all of ``expect`` shows (a tuple: any one of its texts),
    or an ``empty`` text does;
    ``checks`` are (problem, JavaScript that is true when the page shows that problem), evaluated once it settled."""

    name: str
    url: str
    expect: list[str | tuple[str, ...]]
    empty: list[str] = field(default_factory=list)
    checks: list[tuple[str, str]] = field(default_factory=list)
    tab: str | None = None
    problems: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    png: Path | None = None

    @property
    def where(self) -> str:
        return f"{self.url} (tab {self.tab})" if self.tab else self.url


# --- the state and its services -------------------------------------------------------------------------------


def build_demo(home: Path, server: PrefectServer, log: Path) -> None:
    """`make demo` in ``home``: the demo tickets dropped into the landing folder, then one `tuneloop run`."""
    landing = home / "landing"
    landing.mkdir(parents=True, exist_ok=True)
    part = landing / "tickets.jsonl.part"
    shutil.copyfile(ROOT / "data" / "demo" / "tickets.jsonl", part)
    part.rename(landing / "tickets.jsonl")
    args = [str(BIN / "tuneloop"), "run", "--config", str(DEMO_CONFIG), *[x for s in SPEED for x in ("--set", s)]]
    env = {**server.env, "TUNELOOP_HOME": str(home)}
    env.pop("MLFLOW_TRACKING_URI", None)  # the registry goes to the state folder's SQLite, as in `make demo`
    print(f"running the demo pipeline (log: {log}) ...", flush=True)
    with log.open("wb") as out:
        done = subprocess.run(args, env=env, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, timeout=1800)
    if done.returncode != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        raise ShotProblem(f"the demo pipeline failed (exit {done.returncode}): {tail[0]}; see {log}")


def prefect_server_on(home: Path) -> PrefectServer:
    """A Prefect server on the state folder's own database ($TUNELOOP_HOME/prefect/prefect.db, where
    `tuneloop run` and `make prefect-ui` keep it), on a free port."""
    server = PrefectServer(home / "prefect")
    server.env["PREFECT_HOME"] = str(home / "prefect")
    server.env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{home / 'prefect' / 'prefect.db'}"
    server.env["PREFECT_SERVER_API_PORT"] = str(server.port)
    return server


def start_mlflow_ui(home: Path, server: PrefectServer) -> str:
    """`make mlflow-ui` on a free port; started through ``server`` so that it is stopped with it (by group)."""
    port = free_port()
    proc = server.spawn([str(BIN / "mlflow"), "ui", "--backend-store-uri", f"sqlite:///{home / 'mlflow.db'}",
                         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"], "mlflow-ui.log")
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        if proc.poll() is not None:
            raise ShotProblem(f"mlflow ui exited: see {server.root / 'mlflow-ui.log'}")
        return answers(f"{url}/health")

    wait_until(healthy, 120, "mlflow ui to answer /health")
    return url


def http_json(url: str, body: dict | None = None) -> dict | list:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


# --- the pages ------------------------------------------------------------------------------------------------


def prefect_pages(api: str) -> list[Page]:
    ui = api.removesuffix("/api")
    runs = http_json(f"{api}/flow_runs/filter", {"flows": {"name": {"any_": ["retrain"]}},
                                                  "flow_runs": {"state": {"type": {"any_": ["COMPLETED"]}}},
                                                  "sort": "START_TIME_DESC", "limit": 1})
    if not runs:
        raise ShotProblem(f"no completed retrain flow run in the Prefect server ({api}): run the pipeline first")
    run = runs[0]
    tasks = http_json(f"{api}/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}},
                                                  "sort": "EXPECTED_START_TIME_ASC"})
    artifacts = http_json(f"{api}/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [run["id"]]},
                                                                   "type": {"not_any_": ["result"]}}})
    page = f"{ui}/runs/flow-run/{run['id']}"
    pages = [
        Page("prefect-runs", f"{ui}/runs", [run["name"], "retrain"], PREFECT_EMPTY),
        Page("prefect-run-graph", page, [run["name"], "Completed"], PREFECT_EMPTY,
             [("the run graph draws nothing", "!document.querySelector('canvas')")]),
        Page("prefect-task-runs", page, [run["name"]] + sorted({t["name"] for t in tasks[:1] + tasks[-1:]}),
             PREFECT_EMPTY, tab="Task Runs"),
        Page("prefect-artifacts", page, [run["name"]] + ([a["key"] for a in artifacts if a.get("key")] or ["evaluation"]),
             PREFECT_EMPTY, tab="Artifacts"),
    ]
    evaluation = [a for a in artifacts if a.get("key") == "evaluation"]
    if evaluation:
        pages.append(Page("prefect-evaluation-artifact", f"{ui}/artifacts/artifact/{evaluation[0]['id']}",
                          ["evaluation", "held-out examples"], PREFECT_EMPTY))  # any task: "Evaluation on N held-out examples"
    else:
        pages[-1].problems.append(f"the retrain run {run['name']} has no 'evaluation' artifact in the API")
    return pages


def mlflow_pages(ui: str) -> list[Page]:
    api = f"{ui}/ajax-api/2.0/mlflow"
    models = http_json(f"{api}/registered-models/search?max_results=10").get("registered_models", [])
    versions = [v for m in models for v in m.get("latest_versions", [])]
    if not versions:
        raise ShotProblem(f"no registered model version in MLflow ({ui}): run the pipeline first")
    version = max(versions, key=lambda v: int(v.get("creation_timestamp", 0)))
    run = http_json(f"{api}/runs/get?run_id={version['run_id']}")["run"]
    experiment = run["info"]["experiment_id"]
    name = run["info"].get("run_name") or run["info"]["run_id"]
    metrics = sorted(m["key"] for m in run["data"].get("metrics", []))
    at = f"{ui}/#/experiments/{experiment}/runs/{run['info']['run_id']}"
    # What the run logged, so that an empty Datasets / Logged models field is known to be wrong.
    datasets = sorted({d["dataset"]["name"] for d in run.get("inputs", {}).get("dataset_inputs", [])})
    models = [o["model_id"] for o in run.get("outputs", {}).get("model_outputs", [])]
    dataset_shown = [(f"the {{}} shows no dataset although the run logged {', '.join(datasets)}",
                      f"!document.body.innerText.includes({json.dumps(datasets[0])})")] if datasets else []
    model_shown = [(f"'Logged models' shows none although the run logged model {models[0]}",
                    f"!document.querySelector('a[href*={json.dumps(models[0])}]')")] if models else []
    return [
        Page("mlflow-runs", f"{ui}/#/experiments/{experiment}/runs{ML}", [name], MLFLOW_EMPTY,
             [GENAI_VIEW] + [(p.format("Dataset column"), js) for p, js in dataset_shown]),
        Page("mlflow-run", f"{at}{ML}", [name, *(metrics[:1])], MLFLOW_EMPTY,
             [GENAI_VIEW] + [(p.format("Datasets field"), js) for p, js in dataset_shown] + model_shown),
        # Charts are grouped by the key's prefix ("data/n_read" is "n_read" under "data") and drawn as they
        # scroll into view: any one chart title of the run's metrics will do.
        Page("mlflow-model-metrics", f"{at}/model-metrics{ML}", [tuple(sorted({k.rsplit("/", 1)[-1] for k in metrics}))],
             MLFLOW_EMPTY, [GENAI_VIEW]),
        Page("mlflow-model-version",
             f"{ui}/#/models/{urllib.parse.quote(version['name'])}/versions/{version['version']}{ML}",
             [f"Version {version['version']}", version["name"]], MLFLOW_EMPTY),
    ]


def data_docs_pages(home: Path) -> list[Page]:
    indexes = sorted((home / "runs").glob("*/data_docs/index.html"), key=lambda p: p.stat().st_mtime)
    if not indexes:
        raise ShotProblem(f"no Data Docs under {home / 'runs'}: run the pipeline with quality.data_docs on")
    docs = indexes[-1].parent
    validations = sorted(docs.glob("validations/**/*.html"))
    pages = [Page("data-docs", indexes[-1].as_uri(), ["Validation Results"], [],
                  [(f"the Validation Results table lists none of the {len(validations)} validations on disk",
                    f"{len(validations)} > 0 && !document.querySelector('a[href*=\"validations/\"]')")])]
    if validations:  # the records' suite (not the chat format's): where quarantined rows are named by file and line
        shown = next((v for v in validations if "chat_examples" not in v.parts), validations[0])
        suite = shown.relative_to(docs / "validations").parts[0]
        pages.append(Page("data-docs-validation", shown.as_uri(), [suite, "Overview"]))
    return pages


# --- the browser ----------------------------------------------------------------------------------------------


class Tab:
    """One Chromium tab over its DevTools websocket: commands, and the events that arrive meanwhile."""

    def __init__(self, ws_url: str):
        from websockets.sync.client import connect

        self.ws = connect(ws_url, max_size=None, proxy=None, open_timeout=30)
        self.next_id = 0
        self.events: list[dict] = []

    def send(self, method: str, timeout: float = 60, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        deadline = time.monotonic() + timeout
        while True:
            message = json.loads(self.ws.recv(timeout=max(0.1, deadline - time.monotonic())))
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error'].get('message')}")
                return message.get("result", {})
            if "method" in message:
                self.events.append(message)

    def pump(self, seconds: float) -> None:
        """Collect the events that arrive within ``seconds``."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                self.events.append(json.loads(self.ws.recv(timeout=left)))
            except TimeoutError:
                return

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            return None
        return result.get("result", {}).get("value")

    def close(self) -> None:
        self.ws.close()


class Chromium:
    """Headless Chromium that may reach 127.0.0.1 only: any other host fails to resolve, and every request that
    would leave the machine goes to a proxy that is not there."""

    def __init__(self, binary: str, profile: Path, log: Path):
        args = [binary, "--headless", "--no-sandbox", "--disable-gpu", "--enable-unsafe-swiftshader",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--no-first-run", "--no-default-browser-check", "--hide-scrollbars",
                "--mute-audio", f"--user-data-dir={profile}", "--remote-debugging-port=0",
                f"--window-size={WIDTH},{HEIGHT}",
                "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1, EXCLUDE localhost",
                f"--proxy-server=http://127.0.0.1:{free_port()}", "--proxy-bypass-list=<-loopback>;127.0.0.1;localhost",
                "about:blank"]
        self.proc = subprocess.Popen(args, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)
        port_file = profile / "DevToolsActivePort"

        def listening():
            if self.proc.poll() is not None:
                raise ShotProblem(f"chromium exited ({self.proc.returncode}): see {log}")
            return port_file.exists() and len(port_file.read_text().splitlines()) >= 2

        wait_until(listening, 60, "chromium's DevTools port")
        self.port = int(port_file.read_text().splitlines()[0])

    def visit(self, page: Page, out: Path, timeout: float) -> None:
        """Load the page in a fresh tab, wait until it shows what it should, save the PNG, record its problems."""
        target = http_json_put(f"http://127.0.0.1:{self.port}/json/new?about:blank")
        tab = Tab(target["webSocketDebuggerUrl"])
        try:
            for domain in ("Page", "Runtime", "Log", "Network"):
                tab.send(f"{domain}.enable")
            tab.send("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)
            navigated = tab.send("Page.navigate", url=page.url)
            if navigated.get("errorText"):
                page.problems.append(f"did not load: {navigated['errorText']}")
            if page.tab:
                self._click_tab(tab, page, timeout)
            self._wait(tab, page, timeout)
            if page.tab:  # show the tab's content, as a person scrolls to it
                tab.evaluate(f"{TAB_JS % json.dumps(page.tab)}?.scrollIntoView({{block: 'start'}})")
                tab.pump(0.5)
            shot = tab.send("Page.captureScreenshot", format="png")
            out.mkdir(parents=True, exist_ok=True)
            page.png = out / f"{page.name}.png"
            page.png.write_bytes(base64.b64decode(shot["data"]))
            tab.pump(0.2)
            problems, ignored = console_problems(tab.events)
            page.problems.extend(problems)
            page.ignored.extend(ignored)
        finally:
            tab.close()
            urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/close/{target['id']}", timeout=10).close()

    @staticmethod
    def _click_tab(tab: Tab, page: Page, timeout: float) -> None:
        find = TAB_JS % json.dumps(page.tab)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if tab.evaluate(f"(() => {{ const el = {find}; if (el) el.click(); return !!el; }})()"):
                return
            tab.pump(0.25)
        page.problems.append(f"has no {page.tab!r} tab to click within {timeout:.0f}s")

    @staticmethod
    def _wait(tab: Tab, page: Page, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            tab.pump(0.25)
            state, text = tab.evaluate("[document.readyState, document.body ? document.body.innerText : '']") or ["", ""]
            if state == "complete" and (all(shows(e, text) for e in page.expect) or any(e in text for e in page.empty)):
                timed_out = False
                break
            if time.monotonic() >= deadline:
                timed_out = True
                break
        # Settled: no request in flight for a second (the UIs poll, so give up on that after 10 s).
        quiet_since, settle_by = time.monotonic(), time.monotonic() + 10
        while time.monotonic() < settle_by and time.monotonic() - quiet_since < 1.0:
            tab.pump(0.2)
            if in_flight(tab.events):
                quiet_since = time.monotonic()
        text = tab.evaluate("document.body ? document.body.innerText : ''") or text
        missing = [e for e in page.expect if not shows(e, text)]
        if missing:
            page.problems.append(f"did not show {', '.join(describe(m) for m in missing)}"
                                 + (f" within {timeout:.0f}s" if timed_out else ""))
        page.problems.extend(f"shows {e!r}" for e in page.empty if e in text)
        page.problems.extend(problem for problem, shows in page.checks if tab.evaluate(shows))

    def stop(self) -> None:
        stop_group(self.proc)


def shows(expected: str | tuple[str, ...], text: str) -> bool:
    return any(e in text for e in expected) if isinstance(expected, tuple) else expected in text


def describe(expected: str | tuple[str, ...]) -> str:
    if not isinstance(expected, tuple):
        return repr(expected)
    return f"any of {', '.join(map(repr, expected[:3]))}" + (f" (+{len(expected) - 3} more)" if len(expected) > 3 else "")


# The visible tab (a role=tab element or a tab list's item, else a button or link) whose text is exactly the given one.
TAB_JS = ("[...document.querySelectorAll('[role=tab], [role=tablist] > *, button, a')]"
          ".find(e => e.offsetParent !== null && e.innerText.trim() === %s)")


def http_json_put(url: str) -> dict:
    with urllib.request.urlopen(urllib.request.Request(url, method="PUT"), timeout=30) as response:
        return json.load(response)


def in_flight(events: list[dict]) -> int:
    pending: set[str] = set()
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Network.requestWillBeSent" and params.get("type") != "EventSource":
            pending.add(params["requestId"])
        elif method in ("Network.loadingFinished", "Network.loadingFailed"):
            pending.discard(params.get("requestId"))
    return len(pending)


def console_problems(events: list[dict]) -> tuple[list[str], list[str]]:
    """Console errors, uncaught exceptions and failed requests, one line each, in the order they came; and the
    harmless ones (see HARMLESS), with why they are harmless."""
    urls: dict[str, str] = {}
    lines: list[str] = []
    offline: dict[str, None] = {}
    failed_urls: set[str] = set()
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Network.requestWillBeSent":
            urls[params["requestId"]] = params["request"]["url"]
        elif method == "Network.loadingFailed" and params.get("errorText") != "net::ERR_ABORTED" \
                and not params.get("canceled"):
            url = urls.get(params["requestId"], "?")
            failed_urls.add(url)
            host = urllib.parse.urlsplit(url).hostname or ""
            if params.get("errorText") in OFFLINE_ERRORS and host not in ("127.0.0.1", "localhost"):
                offline[host] = None
            else:
                lines.append(f"request failed: {url} ({params.get('errorText')})")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            lines.append(f"console error: {' '.join(remote_text(a) for a in params.get('args', []))}")
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            where = f" at {details['url']}:{details.get('lineNumber', 0) + 1}" if details.get("url") else ""
            lines.append(f"uncaught exception: {details.get('text', '')} {remote_text(details.get('exception', {}))}"
                         f"{where}")
    for event in events:
        if event.get("method") == "Log.entryAdded":
            entry = event["params"]["entry"]
            if entry.get("level") == "error" and entry.get("url") not in failed_urls:
                lines.append(f"console error: {entry.get('text')} {entry.get('url', '')}")
    if offline:
        lines.insert(0, f"needs {len(offline)} host(s) besides 127.0.0.1, unreachable offline (a CDN): "
                        f"{', '.join(offline)}")
    problems, ignored = [], []
    for line in dict.fromkeys(short(x) for x in lines):
        why = next((why for marker, why in HARMLESS if marker in line), None)
        (problems if why is None else ignored).append(line if why is None else f"{line} [{why}]")
    return problems, ignored


def remote_text(value: dict) -> str:
    """A console argument or thrown value as text (a CDP RemoteObject)."""
    if value.get("type") == "undefined":
        return ""
    if "value" in value and value["value"] is not None:
        return value["value"] if isinstance(value["value"], str) else json.dumps(value["value"])
    text = value.get("description") or value.get("className") or value.get("subtype") or ""
    return text.splitlines()[0] if text else ""


def short(line: str, limit: int = 300) -> str:
    line = " ".join(line.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


# --- the command ----------------------------------------------------------------------------------------------


def print_summary(pages: list[Page]) -> None:
    width = max(len(p.name) for p in pages)
    print(f"\n{'page'.ljust(width)}  problems  png / url")
    for p in pages:
        png = p.png.relative_to(ROOT) if p.png and p.png.is_relative_to(ROOT) else (p.png or "(none)")
        print(f"{p.name.ljust(width)}  {len(p.problems):>8}  {png}\n{''.ljust(width)}            {p.where}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, help="reuse this state folder ($TUNELOOP_HOME) instead of running the demo")
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="where the PNGs go (default: docs/)")
    parser.add_argument("--timeout", type=float, default=45, help="seconds a page may take to show its data")
    args = parser.parse_args(argv)
    for key, value in TELEMETRY_OFF.items():
        os.environ.setdefault(key, value)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chromium:
        print("docs/screenshot.py: no chromium found: install it (Debian: apt-get install chromium)", file=sys.stderr)
        return 2
    if args.home and not (args.home / "mlflow.db").exists():
        print(f"docs/screenshot.py: {args.home} holds no mlflow.db: pass the state folder of a finished run "
              "(e.g. .tuneloop after `make demo`)", file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="tuneloop-shot-"))
    home = args.home.resolve() if args.home else work / "home"
    server = prefect_server_on(home)
    browser = None
    pages: list[Page] = []
    try:
        server.start()
        if not args.home:
            build_demo(home, server, work / "demo.log")
        mlflow_ui = start_mlflow_ui(home, server)
        pages = prefect_pages(server.url) + mlflow_pages(mlflow_ui) + data_docs_pages(home)
        (work / "chromium").mkdir()
        browser = Chromium(chromium, work / "chromium", work / "chromium.log")
        for page in pages:
            print(f"visiting {page.name}: {page.where}", flush=True)
            browser.visit(page, args.out, args.timeout)
    except (ShotProblem, AssertionError) as exc:
        print(f"docs/screenshot.py: {exc}", file=sys.stderr)
        return 1
    finally:
        if browser:
            browser.stop()
        server.stop()
        shutil.rmtree(work / "chromium", ignore_errors=True)
        if args.home:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"demo state kept in {home} (reuse it: --home {home})")
    print_summary(pages)
    ignored = [f"{p.name}: {line}" for p in pages for line in p.ignored]
    if ignored:
        print(f"\nignored, harmless ({len(ignored)}):")
        print("\n".join(ignored))
    problems = [f"{p.name}: {problem}" for p in pages for problem in p.problems]
    if problems:
        print(f"\n{len(problems)} problem(s):")
        print("\n".join(problems))
        return 1
    print("\nall pages show their data, with no console errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
