"""The MLflow UI as a researcher opens it: a real tiny run on the session's `mlflow server` (127.0.0.1, the UI
that `mlflow ui` serves too), headless Chromium.

Checks that the run page shows the description, the method tag, the dataset and the source commit, that
the metrics tab has the grouped sections, that the artifacts and the registered model's aliases show.
Chromium comes from Debian (`make setup` installs it as root), driven by Playwright; without either the
test is skipped saying which is missing. The docs' screenshots come from the demo's store:
    HARDNEG_UI_STORE=sqlite:///$PWD/demo_out/mlflow.db HARDNEG_SCREENSHOTS=docs pytest tests/test_mlflow_ui.py
(HARDNEG_UI_STORE: use that store's newest run instead of training one; HARDNEG_SCREENSHOTS: also save there.)
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import ARTIFACTS_ON, free_port, tiny_config

CHROMIUM = os.environ.get("HARDNEG_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="playwright not installed (pip install playwright)")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.server,  # mlflow ui
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no Chromium: apt-get install -y chromium (make setup "
        "does it as root), or set HARDNEG_CHROMIUM to a Chromium binary",
    ),
]


@pytest.fixture(scope="module")
def ui_run(tmp_path_factory, request):
    """One real tiny SSCL run logged to the session's `mlflow server` (which serves MLflow's UI); with
    HARDNEG_UI_STORE, the newest run of that store, served by `mlflow ui` on a free 127.0.0.1 port."""
    from pipeline.app import train_command

    tmp = tmp_path_factory.mktemp("ui")
    uri = os.environ.get("HARDNEG_UI_STORE")
    if not uri:
        url = request.getfixturevalue("shared_mlflow_server")
        result = train_command.train_run(
            tiny_config(
                tmp,
                request.getfixturevalue("digits_shards"),
                "cluster.launcher=local",
                "loss.name=sscl",
                "train.knn_every_epochs=1",
                "tracking.system_metrics_every_s=0",
                f"tracking.uri={url}",
                "tracking.experiment=ui",  # the shared server's other tests log to experiments of their own
                *ARTIFACTS_ON,
            )
        )
        yield url, result, tmp
        return
    from mlflow.tracking import MlflowClient

    newest = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("hardneg").experiment_id],
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )[0]
    result = {"tracking_uri": uri, "mlflow_run_id": newest.info.run_id}
    port = free_port()
    mlflow_bin = os.path.join(os.path.dirname(sys.executable), "mlflow")
    log = open(tmp / "ui.log", "w")
    proc = subprocess.Popen(
        [mlflow_bin, "ui", "--backend-store-uri", uri, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError("mlflow ui did not start:\n" + (tmp / "ui.log").read_text()[-3000:])
            time.sleep(1)
        yield url, result, tmp
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def _open(page, url: str, *needles: str) -> str:
    """Go to ``url`` and wait (up to 90 s: the UI renders client-side) until the page shows every needle."""
    page.goto(url)
    script = (
        "needles => needles.every(n => document.body && document.body.innerText.replace(/\\u00a0/g, ' ').includes(n))"
    )
    try:
        page.wait_for_function(script, arg=list(needles), timeout=90_000)
    except playwright.TimeoutError:
        pass  # the assertion below names what is missing
    return page.inner_text("body").replace("\u00a0", " ")  # the UI puts no-break spaces in e.g. "@ best"


def _save(page, name: str, tmp) -> None:
    page.screenshot(path=str(tmp / name))
    target = os.environ.get("HARDNEG_SCREENSHOTS")
    if target:  # 128 colours: a UI screenshot stays legible at a fraction of the size
        from PIL import Image

        with Image.open(tmp / name) as image:
            image.convert("RGB").quantize(colors=128).save(os.path.join(target, name), optimize=True)


def test_run_pages_show_the_described_run_grouped_metrics_and_models(ui_run):
    from mlflow.tracking import MlflowClient

    url, result, tmp = ui_run
    run = MlflowClient(result["tracking_uri"]).get_run(result["mlflow_run_id"])
    experiment, run_id = run.info.experiment_id, run.info.run_id
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=CHROMIUM, headless=True, args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            base = f"{url}/#/experiments/{experiment}/runs/{run_id}"

            text = _open(page, base, "Description", "Datasets", "method")
            for needle in (
                "sscl (temperature=",
                "builtin:digits",
                "digits (",
                "hardneg train",
                run.data.tags["mlflow.source.git.commit"][:7],
                "world_size",
                "eval/knn_top1_best",
            ):
                assert needle in text, f"run page lacks {needle!r}"
            assert "method\n: sscl" in text or "method: sscl" in text.replace("\n", "")
            for metric in (
                "negatives/same_class_share_of_hardest",
                "negatives/cos_synthetic_mean",
                "perf/images_per_s",
                "train/loss",
            ):
                assert metric in text, metric  # the overview's table lists them (the charts tab renders lazily)
            assert "loss.psm_" not in text and "tracking.run_id" not in text  # only the method's own params
            close = page.locator("button[aria-label=Close]")  # the assistant panel hides half a screenshot
            if close.count():
                close.first.click()
            _save(page, "mlflow-run.png", tmp)

            text = _open(page, f"{base}/model-metrics", "train", "eval", "negatives", "perf", "knn_top1_best")
            for section in ("train", "eval", "negatives", "perf"):
                assert f"\n{section}\n" in f"\n{text}\n", f"no '{section}' metric section on the metrics tab"
            _save(page, "mlflow-metrics.png", tmp)

            text = _open(page, f"{base}/artifacts", "plots", "checkpoints")
            assert "plots" in text and "checkpoints" in text and "curves.png" not in text

            text = _open(page, f"{url}/#/models/hardneg-encoder", "@ best", "@ last")
            assert "@ best" in text and "@ last" in text and "Backbone" in text
        finally:
            browser.close()
