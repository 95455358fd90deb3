"""The MLflow UI in a real browser (Debian's Chromium driven by Playwright) over `skinclr server`:
a real sweep's trials nest under their parent, a trial shows its metric charts and confusion
matrix, and the registry shows the promoted model as `champion`.

Needs `apt-get install -y chromium` and `pip install playwright` (no `playwright install`: the
system Chromium is used). SKINCLR_UPDATE_SCREENSHOT=1 also copies the trial page to docs/ui-run.png.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from PIL import Image

from core import tracking
from core.registry import CHAMPION, alias_version, promote
from core.tracking import RunLogger
from tests.core.test_server import running_server

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000
EXPERIMENT = "skinclr-ui"
ML_VIEW = "workflowType=machine_learning"  # the UI opens experiments in its GenAI view otherwise

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sweep_store(synth_dir, tmp_path_factory) -> dict:
    """A real two-trial fine-tune sweep (Ray Tune) in a store of its own, its best trial promoted."""
    from experiments.sweep import main as sweep_main

    root = tmp_path_factory.mktemp("ui-store")
    config = root / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "stage": "finetune",
        "data": {"root": str(synth_dir), "image_size": 32, "workers": 0},
        "train": {"epochs": 2, "batch_size": 16, "max_steps_per_epoch": 5, "seed": 0},
        "finetune": {"init": "scratch"},
        "tracking": {"experiment": EXPERIMENT},
        "sweep": {"stage": "finetune", "space": "search_spaces/finetune.yaml", "num_samples": 2, "max_concurrent": 2,
                  "search": "random", "grace_period": 2, "reduction_factor": 2, "cpus_per_trial": 1,
                  "storage": str(root / "ray"), "name": "ui"}}))
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp_.setenv("SKINCLR_CACHE", str(root / "cache"))
        assert sweep_main(config, []) == 0
        promote(EXPERIMENT)
        c = tracking.client()
        exp = c.get_experiment_by_name(EXPERIMENT)
        runs = c.search_runs([exp.experiment_id])
        [parent] = [r for r in runs if r.data.tags.get("skinclr.sweep") == "1"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        champion = alias_version(c, "skinclr", CHAMPION)
        matrix = RunLogger(champion.run_id).download("report/confusion_matrix.png", root / "expected")
        with Image.open(matrix) as img:
            matrix_size = img.size
        # the server and its log live beside the store, and serve it while the module's tests run
        with running_server(root / "server.log") as (url, _):
            yield {"url": url, "experiment_id": exp.experiment_id, "parent": parent, "children": children,
                   "champion": champion, "matrix_size": matrix_size}


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: install Debian's Chromium with `apt-get install -y chromium`")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is missing: `pip install playwright` (no `playwright install` needed)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, tmp_path):
    context = browser.new_context(viewport={"width": 1600, "height": 1000})
    pg = context.new_page()
    pg.set_default_timeout(TIMEOUT_MS)
    yield pg
    pg.screenshot(path=str(tmp_path / "last.png"), full_page=True)
    context.close()


def _close_assistant(pg) -> None:
    """The UI opens an assistant side panel; it only takes room from the screenshots."""
    close = pg.get_by_role("button", name="Close")
    if close.count() and close.first.is_visible():
        close.first.click()


def test_the_sweep_trials_are_nested_under_their_parent_run(sweep_store, page, tmp_path):
    s, pg = sweep_store, page
    parent, children = s["parent"], s["children"]
    assert len(children) == 2
    pg.goto(f"{s['url']}/#/experiments/{s['experiment_id']}/runs?{ML_VIEW}")
    parent_row = pg.get_by_role("row").filter(has=pg.get_by_role("link", name=parent.info.run_name, exact=True))
    parent_row.first.wait_for()
    child_names = [c.info.run_name for c in children]
    assert all(pg.get_by_role("link", name=n, exact=True).count() == 0 for n in child_names), \
        "trials should be folded under the sweep's parent run until it is expanded"

    parent_row.first.get_by_role("button").first.click()  # the expander in the run-name cell
    parent_link = pg.get_by_role("link", name=parent.info.run_name, exact=True)
    for name in child_names:
        link = pg.get_by_role("link", name=name, exact=True)
        link.wait_for()
        assert link.bounding_box()["x"] > parent_link.bounding_box()["x"], f"{name} is not indented under its parent"
    order = [r.get_attribute("row-id") for r in pg.locator("[row-id]").all()]
    first = order.index(parent.info.run_id)
    assert set(order[first + 1:first + 3]) == {c.info.run_id for c in children}
    _close_assistant(pg)
    pg.screenshot(path=str(tmp_path / "runs-table.png"))

    pg.goto(f"{s['url']}/#/experiments/{s['experiment_id']}/runs/{parent.info.run_id}?{ML_VIEW}")
    pg.get_by_text("Child runs", exact=True).wait_for()
    for name in child_names:
        pg.get_by_role("link", name=name).first.wait_for()


def test_a_trial_shows_its_metric_charts_and_confusion_matrix(sweep_store, page, tmp_path):
    s, pg = sweep_store, page
    child = s["champion"].run_id
    run_page = f"{s['url']}/#/experiments/{s['experiment_id']}/runs/{child}"
    pg.goto(f"{run_page}?{ML_VIEW}")
    pg.get_by_text("Parent run", exact=True).wait_for()
    pg.get_by_role("link", name=s["parent"].info.run_name).first.wait_for()

    pg.get_by_role("tab", name="Model metrics").click()
    chart = pg.get_by_test_id("experiment-view-compare-runs-card").filter(
        has=pg.get_by_role("heading", name="val_balanced_accuracy", exact=True))
    chart.locator(".js-plotly-plot svg.main-svg").first.wait_for()
    line = chart.locator("path.js-line").first.get_attribute("d") or ""
    assert "L" in line, f"the val_balanced_accuracy chart drew no line through its epochs: {line!r}"
    _close_assistant(pg)
    pg.screenshot(path=str(tmp_path / "trial-metrics.png"))

    pg.get_by_role("tab", name="Artifacts").click()
    pg.get_by_text("report", exact=True).click()
    pg.get_by_text("loss_curves.png", exact=True).wait_for()  # the folder has opened
    pg.get_by_text("confusion_matrix.png", exact=True).click()
    pg.wait_for_function(
        "([w, h]) => [...document.images].some(i => i.complete && i.naturalWidth === w && i.naturalHeight === h)",
        arg=list(s["matrix_size"]), timeout=TIMEOUT_MS)
    shot = tmp_path / "trial-confusion-matrix.png"
    pg.screenshot(path=str(shot))
    if os.environ.get("SKINCLR_UPDATE_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        shutil.copyfile(shot, REPO / "docs" / "ui-run.png")


def test_the_registered_model_shows_the_champion_alias(sweep_store, page, tmp_path):
    s, pg = sweep_store, page
    pg.goto(f"{s['url']}/#/models/skinclr")
    row = pg.get_by_role("row").filter(has=pg.get_by_role("link", name=f"Version {s['champion'].version}", exact=True))
    row.first.wait_for()
    assert re.search(rf"@\s*{CHAMPION}\b", row.first.inner_text()), row.first.inner_text()
    pg.screenshot(path=str(tmp_path / "registered-model.png"))
