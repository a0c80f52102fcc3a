"""Take docs/prefect-ui.png: a real Prefect server with `tuneloop serve` + `tuneloop watch`, one file landed,
the retrain it triggered completed, then headless Chromium on the UI's runs and deployments pages.

    .venv/bin/python docs/screenshot.py   # needs a chromium binary (Debian: apt-get install chromium)
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from services import BIN, PrefectServer, wait_until  # noqa: E402

SETS = ["train.local.max_steps=30", "evaluate.max_examples=20", "schedule.poll_seconds=0.5"]


def retrain_runs(server: PrefectServer) -> list:
    import asyncio

    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_flow_runs()

    with server.client_settings():
        return [r for r in asyncio.run(read()) if r.deployment_id is not None]


def shoot(chromium: str, url: str, out: Path) -> None:
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--hide-scrollbars", "--window-size=1440,900",
                    "--virtual-time-budget=15000", f"--screenshot={out}", url], check=True, capture_output=True,
                   timeout=120)


def main() -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if not chromium:
        sys.exit("docs/screenshot.py: no chromium found (Debian: apt-get install chromium)")
    work = Path(tempfile.mkdtemp(prefix="tuneloop-shot-"))
    server = PrefectServer(work / "prefect")
    home = work / "home"
    (home / "landing").mkdir(parents=True)
    sets = [x for s in SETS + [f"register.tracking_uri=sqlite:///{work / 'mlflow.db'}"] for x in ("--set", s)]
    env = {"TUNELOOP_HOME": str(home)}
    try:
        server.start()
        server.spawn([str(BIN / "tuneloop"), "serve", "--config", str(ROOT / "deployments/demo.yaml"), *sets],
                     "serve.log", env=env, cwd=ROOT)
        wait_until(lambda: "retrain" in server.cli("deployment", "ls"), 120, "deployments")
        lines = (ROOT / "data/demo/tickets.jsonl").read_text().splitlines(True)
        part = home / "landing" / "tickets-2026-11-22.jsonl.part"
        part.write_text("".join(lines[:400]))
        part.rename(part.with_suffix(""))
        wait_until(lambda: any(r.state.is_completed() for r in retrain_runs(server)), 300, "the triggered retrain")
        time.sleep(2)
        base = server.url.removesuffix("/api")
        shoot(chromium, f"{base}/runs", ROOT / "docs" / "prefect-ui.png")
        shoot(chromium, f"{base}/deployments", ROOT / "docs" / "prefect-ui-deployments.png")
    finally:
        server.stop()
    print("wrote docs/prefect-ui.png and docs/prefect-ui-deployments.png")


if __name__ == "__main__":
    main()
