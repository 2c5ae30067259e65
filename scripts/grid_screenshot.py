"""Screenshot of a reproduce grid in the MLflow UI: the parent run with its cells nested under it (docs/cluster.md).

    .venv/bin/python scripts/grid_screenshot.py sqlite:///$PWD/results/digits-grid.db digits-grid docs/mlflow-grid.png

The set-up of tests/test_mlflow_ui.py: `mlflow ui` on a free 127.0.0.1 port over the store, Debian's Chromium driven
headless by Playwright; the runs list of the grid's experiment with the parent expanded. Run by hand, not a test.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(uri: str, log_path: str) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
    proc = subprocess.Popen(
        [mlflow_bin, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=open(log_path, "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            proc.kill()
            raise SystemExit("mlflow ui did not start:\n" + open(log_path).read()[-3000:])
        time.sleep(1)


def main(uri: str, experiment: str, out: str) -> None:
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import sync_playwright

    found = MlflowClient(uri).get_experiment_by_name(experiment)
    if found is None:
        raise SystemExit(f"no experiment {experiment!r} in {uri}")
    chromium = os.environ.get("HARDNEG_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    tmp = tempfile.mkdtemp(prefix="grid-shot-")
    proc, url = _serve(uri, os.path.join(tmp, "ui.log"))
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=chromium,
                headless=True,
                args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"],
            )
            page = browser.new_page(viewport={"width": 1400, "height": 760})
            page.goto(f"{url}/#/experiments/{found.experiment_id}/runs")
            page.wait_for_function(
                "name => document.body && document.body.innerText.includes(name)", arg=experiment, timeout=90_000
            )
            close = page.locator("button[aria-label=Close]")  # the assistant panel hides half the page
            if close.count():
                close.first.click()
            expand = page.locator("[aria-label*='xpand'], button:has-text('+')")  # the parent's nested-runs toggle
            for i in range(expand.count()):
                try:
                    expand.nth(i).click(timeout=2000)
                except Exception:  # a toggle that is not the parent's
                    pass
            time.sleep(3)
            shot = os.path.join(tmp, "grid.png")
            page.screenshot(path=shot)
            browser.close()
        from PIL import Image

        with Image.open(shot) as image:  # 128 colours: legible at a fraction of the size
            image.convert("RGB").quantize(colors=128).save(out, optimize=True)
        print(f"wrote {out}")
    finally:
        proc.terminate()
        proc.wait(timeout=20)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
