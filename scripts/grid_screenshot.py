"""Screenshot of a reproduce grid in the MLflow UI: the parent run with its cells nested under it (docs/cluster.md).

    .venv/bin/python scripts/grid_screenshot.py sqlite:///$PWD/results/digits-grid.db digits-grid docs/mlflow-grid.png

The set-up of tests/test_mlflow_ui.py: `mlflow ui` on a free 127.0.0.1 port over the store, Debian's Chromium driven
headless by Playwright; the runs list of the grid's experiment with the parent expanded. Run by hand, not a test.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

EXPAND = "button, [role=button]"  # in the parent's row, the first is the toggle of its nested runs


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
    parent_name = experiment  # reproduce names the parent run after the grid
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
            parent = page.locator("div[role=row]", has_text=parent_name).first  # the grid's parent run
            parent.wait_for(timeout=120_000)
            close = page.locator("button[aria-label=Close]")  # the assistant panel hides half the page
            if close.count():
                close.first.click()
            if os.environ.get("HARDNEG_DUMP_HTML"):  # to find the toggle when MLflow's markup changes
                open(os.path.join(tmp, "row.html"), "w").write(parent.inner_html())
                print(os.path.join(tmp, "row.html"))
            parent.locator(EXPAND).first.click()  # its nested runs
            page.locator("div[role=row]", has_text="-s0").first.wait_for(timeout=60_000)  # a cell: <m>-<d>-s0
            time.sleep(2)
            shot = os.path.join(tmp, "grid.png")
            page.screenshot(path=shot)
            browser.close()
        from PIL import Image

        with Image.open(shot) as image:  # 128 colours: legible at a fraction of the size
            image.convert("RGB").quantize(colors=128).save(out, optimize=True)
        print(f"wrote {out}")
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # mlflow ui's server runs in processes of its own session
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


if __name__ == "__main__":
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    main(*sys.argv[1:])
