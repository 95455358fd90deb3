"""Links into the MLflow UI, in its model-training view."""
from skinclr.track import server, tracking, store
from skinclr import names
from skinclr.track.tracking import RunLogger


def test_links_open_the_ui_in_its_model_training_view(monkeypatch):
    run = RunLogger.create("links")
    exp = run.run.info.experiment_id
    view = "?workflowType=machine_learning"
    assert tracking.run_link(run.run_id) == f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{run.run_id}{view}"
    assert tracking.experiment_link(exp) == f"http://127.0.0.1:5000/#/experiments/{exp}/runs{view}"
    assert tracking.model_link("skinclr", 3) == f"http://127.0.0.1:5000/#/models/skinclr/versions/3{view}"
    assert tracking.experiments_link() == f"http://127.0.0.1:5000/#/experiments{view}"
    assert "skinclr server" in tracking.browse_hint()
    monkeypatch.setenv(tracking.UI_ENV, "http://ui.example:8080/")
    assert tracking.experiments_link() == f"http://ui.example:8080/#/experiments{view}"
    monkeypatch.delenv(tracking.UI_ENV)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "https://me:secret@mlflow.example")
    assert tracking.ui_base() == "https://mlflow.example" and tracking.browse_hint() == ""


def test_the_server_lists_skinclr_experiments_with_links_to_their_runs():
    RunLogger.create("listed", tags={names.STAGE_TAG: "finetune"}).end()
    tracking.client().create_experiment("made elsewhere")
    exp = tracking.client().get_experiment_by_name("listed").experiment_id
    [line] = server.experiment_links("http://host:5000", store.tracking_uri())
    assert "listed" in line and line.endswith(f"http://host:5000/#/experiments/{exp}/runs?workflowType=machine_learning")
