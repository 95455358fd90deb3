"""The MLflow UI in a real browser (Debian's Chromium driven by Playwright) over `skinclr server`,
met the way a skinclr user meets it: a fresh browser profile opens the links skinclr printed, or
the bare server address and a click in the experiments list, and without touching the UI's mode
toggle lands on the runs table with the sweep's parent run and its nested trials, the Dataset and
Models columns; a trial shows its kNN curve, the fine-tuned run its confusion matrix, melanoma
recall by epoch and its system metrics, the sweep's parent Optuna's charts, the registered model
its `champion` alias.

Needs `apt-get install -y chromium` and `pip install playwright` (no `playwright install`: the
system Chromium is used). SKINCLR_UPDATE_SCREENSHOT=1 also writes the README's pictures to docs/;
SKINCLR_UI_STORE=URI takes them from another store (e.g. a real-data sweep's: the pictures in docs/
are from `skinclr sweep --config experiments/studies/resolution.yaml` and `skinclr promote`), its newest sweep
(or SKINCLR_UI_SWEEP=RUN_ID) and the champion of SKINCLR_UI_MODEL (default skinclr).
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import shutil
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from skinclr import names
from skinclr.track import tracking
from skinclr.cli.main import main as cli_main
from skinclr.track.registry import CHAMPION, alias_version
from skinclr.track.tracking import DEFAULT_UI
from skinclr.track.tracking import RunLogger
from tests.track.test_server import running_server

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000
EXPERIMENT, FINETUNE = "skinclr-ui", "skinclr-ui-finetune"

pytestmark = pytest.mark.slow


def printed_link(text: str, marker: str) -> str:
    """The link on the line of `text` that holds `marker`."""
    line = next(line for line in text.splitlines() if marker in line)
    return re.search(r"https?://\S+", line).group(0)


@pytest.fixture(scope="module")
def sweep_store(synth_dir, tmp_path_factory) -> dict:
    """As the quickstart does, in a store of its own: a real two-trial SimCLR sweep (Ray Tune), a
    fine-tune from its best trial, its promotion; with the links those commands printed."""
    from skinclr.config import load_config
    from skinclr.run.runner import run_finetune
    from skinclr.tune.sweep import main as sweep_main

    root = tmp_path_factory.mktemp("ui-store")
    config = root / "sweep.yaml"
    config.write_text(yaml.safe_dump({
        "stage": "pretrain",
        "data": {"root": str(synth_dir), "image_size": 32, "workers": 0},
        "train": {"epochs": 2, "batch_size": 32, "max_steps_per_epoch": 3, "seed": 0},
        "monitor": {"every": 1, "k": 5, "max_bank": 64},
        "tracking": {"experiment": EXPERIMENT},
        "sweep": {"stage": "pretrain", "num_samples": 2, "max_concurrent": 2, "search": "random",
                  "grace_period": 2, "reduction_factor": 2, "cpus_per_trial": 1,
                  "storage": str(root / "ray"), "name": "ui"}}))
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
        mp_.setenv("SKINCLR_CACHE", str(root / "cache"))
        mp_.delenv(tracking.UI_ENV, raising=False)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert sweep_main(config, []) == 0
        sweep_link = printed_link(printed.getvalue(), "follow it in the MLflow UI")
        c = tracking.client()
        exp = c.get_experiment_by_name(EXPERIMENT)
        runs = c.search_runs([exp.experiment_id])
        [parent] = [r for r in runs if r.data.tags.get("skinclr.sweep") == "1"]
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        ft = load_config(REPO / "experiments" / "quickstart_finetune.yaml", [
            f"data.root={synth_dir}", f"finetune.init=runs:/{parent.data.tags['skinclr.best_run_id']}",
            "train.epochs=2", "train.max_steps_per_epoch=3", f"tracking.experiment={FINETUNE}"], stage="finetune")
        mp_.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.5")  # MLflow's knob: samples in a seconds-long run
        finetuned = c.get_run(run_finetune(ft, progress=False).run_id)
        mp_.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert cli_main(["promote", "--experiment", FINETUNE]) == 0
        champion_link = printed_link(printed.getvalue(), "skinclr@champion")
        champion = alias_version(c, "skinclr", CHAMPION)
        matrix = RunLogger(finetuned.info.run_id).download("report/confusion_matrix.png", root / "expected")
        with Image.open(matrix) as img:
            matrix_size = img.size
        # the server and its log live beside the store, and serve it while the module's tests run
        log = root / "server.log"
        with running_server(log) as (url, _):
            printed = log.read_text()
            yield {"url": url, "server_link": printed_link(printed, "  open "),
                   "server_runs_link": printed_link(printed, f" {EXPERIMENT} "),
                   "sweep_link": sweep_link.replace(DEFAULT_UI, url),
                   "champion_link": champion_link.replace(DEFAULT_UI, url),
                   "experiment_link": tracking.experiment_link(exp.experiment_id).replace(DEFAULT_UI, url),
                   "experiment_id": exp.experiment_id, "parent": parent, "children": children,
                   "finetuned": finetuned, "champion": champion, "matrix_size": matrix_size}


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
    """A fresh browser profile: nothing remembered from another page, the UI's mode included."""
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


def _sweep_in_runs_table(pg, parent, children) -> None:
    """The parent run's row, its trials folded under it until expanded, then indented below it."""
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
    assert set(order[first + 1:first + 1 + len(children)]) == {c.info.run_id for c in children}


def test_the_server_links_lead_a_fresh_browser_to_the_sweep_and_its_trials(sweep_store, page, tmp_path):
    s, pg = sweep_store, page
    assert len(s["children"]) == 2
    assert s["server_link"].startswith(s["url"])
    pg.goto(s["server_link"])  # the experiments list, as `skinclr server` printed it
    for name in (EXPERIMENT, FINETUNE):
        pg.get_by_role("link", name=name, exact=True).wait_for()
    pg.goto(s["server_runs_link"])  # the runs of the sweep's experiment, as `skinclr server` printed them
    _sweep_in_runs_table(pg, s["parent"], s["children"])
    _close_assistant(pg)
    pg.screenshot(path=str(tmp_path / "runs-table.png"))


def test_the_quickstart_and_sweep_links_open_the_runs_and_the_parent_run(sweep_store, page):
    s, pg = sweep_store, page
    pg.goto(s["experiment_link"])  # what the quickstart prints for the sweep's trials
    _sweep_in_runs_table(pg, s["parent"], s["children"])

    pg.goto(s["sweep_link"])  # what `skinclr sweep` printed when it started
    pg.get_by_text("Child runs", exact=True).wait_for()
    for child in s["children"]:
        pg.get_by_role("link", name=child.info.run_name).first.wait_for()


def test_a_trial_shows_its_knn_curve(sweep_store, page, tmp_path):
    s, pg = sweep_store, page
    child = s["children"][0]
    pg.goto(tracking.run_link(child.info.run_id, child.info.experiment_id, s["url"]))
    pg.get_by_text("Parent run", exact=True).wait_for()
    pg.get_by_role("link", name=s["parent"].info.run_name).first.wait_for()

    pg.get_by_role("tab", name="Model metrics").click()
    chart = pg.get_by_test_id("experiment-view-compare-runs-card").filter(
        has=pg.get_by_role("heading", name="knn_balanced_accuracy", exact=True))
    chart.locator(".js-plotly-plot svg.main-svg").first.wait_for()
    line = chart.locator("path.js-line").first.get_attribute("d") or ""
    assert "L" in line, f"the knn_balanced_accuracy chart drew no line through its epochs: {line!r}"
    _close_assistant(pg)
    pg.screenshot(path=str(tmp_path / "trial-metrics.png"))


def _show_confusion_matrix(pg, run_page: str, size: tuple[int, int]) -> None:
    pg.goto(run_page)
    pg.get_by_role("tab", name="Artifacts").click()
    pg.get_by_text("report", exact=True).click()
    pg.get_by_text("loss_curves.png", exact=True).wait_for()  # the folder has opened
    pg.get_by_text("confusion_matrix.png", exact=True).click()
    pg.wait_for_function(
        "([w, h]) => [...document.images].some(i => i.complete && i.naturalWidth === w && i.naturalHeight === h)",
        arg=list(size), timeout=TIMEOUT_MS)
    _close_assistant(pg)


def test_the_fine_tuned_run_shows_its_confusion_matrix(sweep_store, page, tmp_path):
    s, pg = sweep_store, page
    run = s["finetuned"].info
    _show_confusion_matrix(pg, tracking.run_link(run.run_id, run.experiment_id, s["url"]), s["matrix_size"])
    pg.screenshot(path=str(tmp_path / "confusion-matrix.png"))


def test_the_promote_link_shows_the_champion_alias(sweep_store, page, tmp_path):
    s, pg = sweep_store, page
    assert f"/versions/{s['champion'].version}" in s["champion_link"]
    pg.goto(s["champion_link"])  # what `skinclr promote` printed
    pg.get_by_text(re.compile(rf"^@?\s*{CHAMPION}$")).first.wait_for()
    pg.goto(f"{s['url']}/#/models/skinclr")
    row = pg.get_by_role("row").filter(has=pg.get_by_role("link", name=f"Version {s['champion'].version}", exact=True))
    row.first.wait_for()
    assert re.search(rf"@\s*{CHAMPION}\b", row.first.inner_text()), row.first.inner_text()
    pg.screenshot(path=str(tmp_path / "registered-model.png"))


def test_a_click_in_the_experiments_list_opens_the_runs_with_their_datasets_and_models(sweep_store, page, tmp_path):
    """From the bare server address in a fresh browser: the experiment clicked in the list opens
    its runs table (not the GenAI traces page), whose Dataset and Models columns say what each run
    learned from and logged; the experiment's Models tab lists the logged model."""
    s, pg = sweep_store, page
    run = s["finetuned"]
    pg.goto(s["url"])
    pg.get_by_role("link", name=FINETUNE, exact=True).first.click()
    row = pg.get_by_role("row").filter(has=pg.get_by_role("link", name=run.info.run_name, exact=True)).first
    row.wait_for()
    assert f"/experiments/{run.info.experiment_id}/runs" in pg.url, pg.url
    data = Path(run.data.tags["data_root"]).name
    pg.get_by_text(f"{data} train", exact=False).first.wait_for()
    cells = " ".join(part.inner_text() for part in pg.locator(f'[row-id="{run.info.run_id}"]').all())  # the grid's halves
    # the Models column names the registered version the run's logged model became (promoted above)
    assert f"{data} train" in cells and "Training" in cells and f"v{s['champion'].version}" in cells.split(), cells
    _close_assistant(pg)
    pg.screenshot(path=str(tmp_path / "runs-from-list.png"))

    pg.get_by_role("link", name="Models", exact=True).first.click()
    listed = pg.get_by_role("row").filter(has=pg.get_by_role("link", name=run.info.run_name, exact=True)).first
    listed.wait_for()  # the logged model's row names its source run and the version it became
    assert f"v{s['champion'].version}" in listed.inner_text().split(), listed.inner_text()
    pg.get_by_role("link", name="model", exact=True).first.wait_for()  # its name, in the grid's other half
    pg.get_by_text("Ready", exact=True).first.wait_for()


def _per_class_chart(pg, run, url: str, metric: str = "val_recall_MEL"):
    pg.goto(tracking.run_link(run.info.run_id, run.info.experiment_id, url))
    pg.get_by_role("tab", name="Model metrics").click()
    pg.get_by_placeholder("Search metric charts").fill(metric)
    chart = pg.get_by_test_id("experiment-view-compare-runs-card").filter(
        has=pg.get_by_role("heading", name=metric, exact=True))
    # drawn, not "visible": a flat line (a recall that stayed 0 through the epochs) has no height,
    # and a browser reports an element without height as invisible
    chart.locator("path.js-line").first.wait_for(state="attached")
    _close_assistant(pg)
    return chart


def test_a_fine_tune_charts_melanoma_sensitivity_by_epoch_and_its_system_metrics(sweep_store, page, tmp_path):
    s, pg = sweep_store, page
    chart = _per_class_chart(pg, s["finetuned"], s["url"])
    line = chart.locator("path.js-line").first.get_attribute("d") or ""
    assert "L" in line, f"val_recall_MEL drew no line through its epochs: {line!r}"
    pg.screenshot(path=str(tmp_path / "per-class.png"))
    pg.get_by_role("tab", name="System metrics").click()
    pg.get_by_role("heading", name="cpu_utilization_percentage", exact=True).wait_for()
    pg.get_by_role("heading", name="system_memory_usage_megabytes", exact=True).wait_for()


def _sweep_chart(pg, parent, url: str, name: str = names.SWEEP_PARALLEL_HTML):
    """The sweep's parent run, its Artifacts tab, Optuna's chart drawn in the artifact viewer."""
    pg.goto(tracking.run_link(parent.info.run_id, parent.info.experiment_id, url))
    pg.get_by_role("tab", name="Artifacts").click()
    pg.get_by_text(names.SWEEP_CHARTS, exact=True).click()
    pg.get_by_text(name, exact=True).click()
    plot = pg.frame_locator("iframe").first.locator(".js-plotly-plot .main-svg").first
    plot.wait_for()
    _close_assistant(pg)
    return plot


def test_the_sweeps_parent_run_shows_optunas_charts_in_the_artifact_viewer(sweep_store, page, tmp_path):
    s, pg = sweep_store, page
    logged = {a.path for a in MlflowClient(s["url"]).list_artifacts(s["parent"].info.run_id, names.SWEEP_CHARTS)}
    assert f"{names.SWEEP_CHARTS}/{names.SWEEP_HISTORY_HTML}" in logged, logged
    _sweep_chart(pg, s["parent"], s["url"], names.SWEEP_HISTORY_HTML)
    pg.screenshot(path=str(tmp_path / "sweep-history.png"))


# ---------------------------------------------------------------------------------------------
# The README's pictures


@contextlib.contextmanager
def _screenshot_source(sweep_store, tmp_path):
    """(server url, sweep parent run, champion's run, its confusion matrix's size) from this
    module's store, or from SKINCLR_UI_STORE's."""
    store = os.environ.get("SKINCLR_UI_STORE", "").strip()
    if not store:
        s = sweep_store
        yield s["url"], s["parent"], s["finetuned"], s["matrix_size"]
        return
    with pytest.MonkeyPatch.context() as mp_:
        mp_.setenv("MLFLOW_TRACKING_URI", store)
        c = tracking.client()
        wanted = os.environ.get("SKINCLR_UI_SWEEP", "").strip()
        parent = c.get_run(wanted) if wanted else c.search_runs(
            [e.experiment_id for e in c.search_experiments()], filter_string="tags.`skinclr.sweep` = '1'",
            order_by=["attributes.start_time DESC"], max_results=1)[0]
        champion = c.get_run(alias_version(c, os.environ.get("SKINCLR_UI_MODEL", "skinclr"), CHAMPION).run_id)
        matrix = RunLogger(champion.info.run_id).download("report/confusion_matrix.png", tmp_path / "expected")
        with Image.open(matrix) as img:
            size = img.size
        if store.startswith(("http://", "https://")):  # a server already
            yield store.rstrip("/"), parent, champion, size
            return
        with running_server(tmp_path / "server.log") as (url, _):
            yield url, parent, champion, size


def test_the_readme_pictures(sweep_store, page, tmp_path):
    """The runs chart view comparing a sweep's trials, and the champion's confusion matrix."""
    pg = page
    with _screenshot_source(sweep_store, tmp_path) as (url, parent, champion, size):
        pg.goto(f"{url}/#/experiments/{parent.info.experiment_id}/runs?{tracking.ML_VIEW}&compareRunsMode=CHART")
        row = pg.get_by_role("row").filter(has=pg.get_by_role("link", name=parent.info.run_name, exact=True))
        row.first.get_by_role("button").first.click()  # unfold the trials: their curves join the charts
        chart = pg.get_by_test_id("experiment-view-compare-runs-card").filter(
            has=pg.get_by_role("heading", name="knn_balanced_accuracy", exact=True))
        # a trial with one epoch so far draws a one-point line, which the chart keeps hidden
        chart.locator("path.js-line >> visible=true").first.wait_for()
        _close_assistant(pg)
        pg.screenshot(path=str(tmp_path / "ui-runs-chart.png"))
        _show_confusion_matrix(pg, tracking.run_link(champion.info.run_id, champion.info.experiment_id, url), size)
        pg.screenshot(path=str(tmp_path / "ui-run.png"))
    if os.environ.get("SKINCLR_UPDATE_SCREENSHOT") == "1":
        (REPO / "docs").mkdir(exist_ok=True)
        for name in ("ui-runs-chart.png", "ui-run.png"):
            shutil.copyfile(tmp_path / name, REPO / "docs" / name)


def _runs_table_with(pg, url: str, parent, metrics: list[str]) -> None:
    """The sweep's experiment, its trials unfolded, metric columns added with the "Columns" button."""
    pg.goto(tracking.experiment_link(parent.info.experiment_id, url))
    row = pg.get_by_role("row").filter(has=pg.get_by_role("link", name=parent.info.run_name, exact=True))
    row.first.get_by_role("button").first.click()
    pg.get_by_role("button", name="Columns").click()
    search = pg.get_by_placeholder("Search columns")
    for metric in metrics:
        search.fill(metric)  # the tree then lists the matching columns; tick the one named exactly so
        node = pg.locator(".du-bois-light-tree-treenode").filter(has_text=re.compile(rf"^{re.escape(metric)}$"))
        node.first.locator(".du-bois-light-tree-checkbox").click()
    pg.keyboard.press("Escape")
    _close_assistant(pg)
    pg.get_by_role("columnheader", name=metrics[0]).first.wait_for()  # the grid draws the columns in view


def test_the_pictures_of_what_a_run_records(sweep_store, page, tmp_path):
    """docs/: the runs table with metric and Dataset columns, a run's logged model, its per-class
    chart, and a sweep's Optuna chart (SKINCLR_UPDATE_SCREENSHOT=1 writes them)."""
    pg = page
    pg.set_viewport_size({"width": 2000, "height": 900})  # room for the metric columns beside Dataset and Models
    with _screenshot_source(sweep_store, tmp_path) as (url, parent, champion, _):
        stage = parent.data.tags.get("skinclr.stage", "")
        metrics = ["val_balanced_accuracy", "val_recall_MEL"] if stage == "finetune" else ["knn_balanced_accuracy"]
        _runs_table_with(pg, url, parent, metrics)
        pg.screenshot(path=str(tmp_path / "ui-runs-table.png"))
        pg.goto(tracking.run_link(champion.info.run_id, champion.info.experiment_id, url))
        models = pg.get_by_text("Logged models", exact=False).first
        models.scroll_into_view_if_needed()
        pg.get_by_role("link", name="model", exact=True).first.wait_for()
        _close_assistant(pg)
        pg.screenshot(path=str(tmp_path / "ui-run-model.png"))
        _per_class_chart(pg, champion, url)
        pg.screenshot(path=str(tmp_path / "ui-per-class.png"))
        _sweep_chart(pg, parent, url)
        pg.wait_for_timeout(1000)  # plotly's lines settle after the frame draws
        pg.screenshot(path=str(tmp_path / "ui-sweep-charts.png"))
    if os.environ.get("SKINCLR_UPDATE_SCREENSHOT") == "1":
        for name in ("ui-runs-table.png", "ui-run-model.png", "ui-per-class.png", "ui-sweep-charts.png"):
            shutil.copyfile(tmp_path / name, REPO / "docs" / name)
