"""The app `skinclr server` runs: MLflow's own server, whose page opens model-training views.

The MLflow 3.17 UI does not read an experiment's `mlflow.experimentKind` tag to pick its view: it
uses the `workflowType` of the link, else the browser's saved choice (localStorage key
`mlflow.workflowType_v1`), and a fresh browser has none, so an experiment clicked in the list
opens the GenAI "Traces" page. This app serves MLflow's page with that choice preset to model
training when the browser has made none; a user who switches to GenAI in the UI keeps that choice.
Loaded by `mlflow server --app-name skinclr` (entry point group `mlflow.app`).
"""
from __future__ import annotations

from pathlib import Path

from flask import Response
from mlflow.server import app as flask_app
from mlflow.server.fastapi_app import create_fastapi_app

VIEW_KEY = "mlflow.workflowType_v1"  # the UI's own saved choice: a JSON string
PRESET = ("<script>try{if(!localStorage.getItem('%s'))localStorage.setItem('%s','\"machine_learning\"')}"
          "catch(e){}</script>" % (VIEW_KEY, VIEW_KEY))


def _page() -> Response:
    html = (Path(flask_app.static_folder) / "index.html").read_text()
    return Response(html.replace("<head>", "<head>" + PRESET, 1), mimetype="text/html")


flask_app.view_functions["serve"] = _page  # MLflow's route for "/": the UI's one page
app = create_fastapi_app(flask_app)
