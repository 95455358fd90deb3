"""The servable model: logged as a pyfunc, loaded back by every URI form, fed every input form,
and preprocessing exactly as the training cache does."""
from __future__ import annotations

import base64
import io
import json
import shutil
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from mlflow.models import convert_input_example_to_serving_input
from mlflow.pyfunc import scoring_server
from PIL import Image

from skinclr.track import tracking
from skinclr.data.images import fit_square
from skinclr.train.augment import eval_transform
from skinclr.data.cache import build_cache
from skinclr.data.manifest import read_manifest
from skinclr.data.images import load_rgb
from skinclr.serve.uris import ModelNotFound, load_predictor
from skinclr.train.models import ModelError, build_classifier
from skinclr.names import CLASSES
from skinclr.data.problems import DataError
from skinclr.serve.pyfunc import log_model, save_pyfunc
from skinclr.track.tracking import RunLogger

pytestmark = pytest.mark.real_data

SIZE = 32
PER_CLASS = 3


def make_labelled_folder(real_data_dir: Path, out: Path, per_class: int = PER_CLASS) -> Path:
    """A small folder in the official validation layout: the first real images of each class."""
    gt = pd.read_csv(real_data_dir / "ISIC2018_Task3_Training_GroundTruth.csv")
    picked = pd.concat([gt[gt[c] == 1.0].head(per_class) for c in CLASSES])
    images = out / "ISIC2018_Task3_Validation_Input"
    images.mkdir(parents=True)
    for name in picked["image"]:
        shutil.copy(real_data_dir / "ISIC2018_Task3_Training_Input" / f"{name}.jpg", images)
    picked.to_csv(out / "ISIC2018_Task3_Validation_GroundTruth.csv", index=False)
    return out


def image_paths(folder: Path) -> list[str]:
    return read_manifest(folder).frame["path"].tolist()


def log_trained(state: dict, aspect: str = "center_crop") -> tuple[str, str]:
    """A finished run holding the model, as a fine-tune run leaves it: (run id, model URI)."""
    logger = RunLogger.create("skinclr-finetune", "serving test")
    uri = log_model(logger, state, "resnet18", SIZE, aspect)
    logger.end()
    return logger.run_id, uri


@pytest.fixture(scope="module")
def labelled_dir(real_data_dir, tmp_path_factory) -> Path:
    return make_labelled_folder(real_data_dir, tmp_path_factory.mktemp("labelled") / "isic-val")


@pytest.fixture(scope="module")
def trained_state(labelled_dir) -> dict:
    """A resnet18 classifier after a few steps on the labelled images: its outputs differ per image."""
    torch.manual_seed(0)
    manifest = read_manifest(labelled_dir)
    transform = eval_transform(SIZE)
    x = torch.stack([transform(fit_square(load_rgb(p), SIZE)) for p in manifest.frame["path"]])
    y = torch.tensor(manifest.frame["label"].to_numpy())
    model = build_classifier("resnet18")
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(5):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_logged_model_loads_by_run_registry_version_and_alias(trained_state, labelled_dir, tmp_path):
    run_id, uri = log_trained(trained_state)
    assert uri == f"runs:/{run_id}/model"
    paths = image_paths(labelled_dir)
    frame = mlflow.pyfunc.load_model(uri).predict(pd.DataFrame({"image": paths}))
    assert list(frame.columns) == list(CLASSES) and len(frame) == len(paths)
    np.testing.assert_allclose(frame.sum(axis=1), 1.0, atol=1e-9)
    assert not np.allclose(frame.to_numpy(), frame.to_numpy()[0], atol=1e-4)  # not one answer for all

    version = mlflow.register_model(uri, "skinclr")
    assert int(version.version) == 1 and version.run_id == run_id
    tracking.client().set_registered_model_alias("skinclr", "champion", version.version)
    for ref in ("models:/skinclr/1", "models:/skinclr@champion"):
        again = mlflow.pyfunc.load_model(ref).predict(pd.DataFrame({"image": paths}))
        np.testing.assert_array_equal(again.to_numpy(), frame.to_numpy())
    for ref in (uri, f"runs:/{run_id}", "models:/skinclr/1", "models:/skinclr@champion"):
        predictor = load_predictor(ref)
        assert predictor.run_id == run_id
        assert predictor.meta["image_size"] == SIZE and predictor.meta["aspect"] == "center_crop"
        np.testing.assert_array_equal(predictor.predict_proba(paths), frame.to_numpy())

    # the model is the run's one MLflow logged model (the Models column and tab); its weights are a
    # plain state_dict beside its meta.json, for torch.load
    c = tracking.client()
    run = c.get_run(run_id)
    assert [c.get_logged_model(o.model_id).name for o in run.outputs.model_outputs] == ["model"]
    assert not c.list_artifacts(run_id)  # nothing stored twice as a plain artifact
    weights = Path(mlflow.artifacts.download_artifacts(f"runs:/{run_id}/model/artifacts", dst_path=str(tmp_path)))
    state = torch.load(weights / "classifier.pt", map_location="cpu", weights_only=True)
    build_classifier("resnet18").load_state_dict(state)  # strict: every key, right shapes
    assert all(torch.equal(state[k], v) for k, v in trained_state.items())
    np.testing.assert_array_equal(load_predictor(weights / "classifier.pt").predict_proba(paths), frame.to_numpy())
    lone = tmp_path / "lone" / "classifier.pt"
    lone.parent.mkdir()
    shutil.copy(weights / "classifier.pt", lone)
    with pytest.raises(ModelNotFound, match="meta.json"):
        load_predictor(lone)


def test_path_base64_bytes_and_arrays_give_identical_probabilities(trained_state, labelled_dir, tmp_path):
    uri = str(save_pyfunc(tmp_path / "model", trained_state, "resnet18", SIZE, "center_crop"))
    paths = image_paths(labelled_dir)[::4]
    predictor = load_predictor(uri)
    by_path = predictor.predict_proba(paths)
    assert by_path.shape == (len(paths), 7)
    arrays = [load_rgb(p) for p in paths]
    encoded = [Path(p).read_bytes() for p in paths]
    b64 = [base64.b64encode(e).decode("ascii") for e in encoded]
    for images in (arrays, np.stack(arrays), encoded, pd.DataFrame({"image": b64}), [Path(p) for p in paths]):
        np.testing.assert_array_equal(predictor.predict_proba(images), by_path)

    pyfunc = mlflow.pyfunc.load_model(uri)
    for column in (paths, b64, arrays):
        got = pyfunc.predict(pd.DataFrame({"image": column}))
        np.testing.assert_array_equal(got.to_numpy(), by_path)
    np.testing.assert_array_equal(pyfunc.unwrap_python_model().predict(None, paths).to_numpy(), by_path)
    np.testing.assert_array_equal(pyfunc.unwrap_python_model().predict(None, np.stack(arrays)).to_numpy(), by_path)


def test_base64_images_round_trip_through_the_rest_scoring_path(trained_state, labelled_dir, tmp_path):
    """The JSON body `mlflow models serve` takes, parsed and scored by the server's own handler."""
    uri = str(save_pyfunc(tmp_path / "model", trained_state, "resnet18", SIZE, "center_crop"))
    paths = image_paths(labelled_dir)[:3]
    b64 = [base64.b64encode(Path(p).read_bytes()).decode("ascii") for p in paths]
    body = convert_input_example_to_serving_input(pd.DataFrame({"image": b64}))
    assert json.loads(body)["dataframe_split"]["columns"] == ["image"]
    pyfunc = mlflow.pyfunc.load_model(uri)
    schema = pyfunc.metadata.get_input_schema()

    response = scoring_server.invocations(body, "application/json", pyfunc, schema)
    assert response.status == 200, response.response
    served = pd.DataFrame(json.loads(response.response)["predictions"])
    assert list(served.columns) == list(CLASSES)
    np.testing.assert_allclose(served.to_numpy(), load_predictor(uri).predict_proba(paths), rtol=0, atol=1e-12)

    example = (Path(uri) / "serving_input_example.json").read_text()  # the example the model ships with
    response = scoring_server.invocations(example, "application/json", pyfunc, schema)
    assert response.status == 200, response.response
    assert len(json.loads(response.response)["predictions"]) == 1


@pytest.mark.parametrize("aspect", ["center_crop", "pad", "stretch"])
def test_served_model_sees_the_pixels_training_saw(trained_state, labelled_dir, tmp_path, aspect):
    """Probabilities from image files equal the classifier run on the training cache's rows."""
    folder = save_pyfunc(tmp_path / "model", trained_state, "resnet18", SIZE, aspect)
    predictor = load_predictor(folder)
    assert predictor.run_id is None and predictor.meta["aspect"] == aspect
    manifest = read_manifest(labelled_dir)
    cache = build_cache(manifest, SIZE, aspect, progress=False)
    transform = eval_transform(SIZE)
    for row, path in enumerate(manifest.frame["path"]):
        torch.testing.assert_close(predictor.preprocess(load_rgb(path)), transform(np.array(cache.images[row])),
                                   rtol=0, atol=0)

    model = build_classifier("resnet18")
    model.load_state_dict(trained_state)
    with torch.no_grad():
        x = torch.stack([transform(np.array(img)) for img in cache.images])
        expected = model.eval()(x).double().softmax(1).numpy()
    np.testing.assert_allclose(predictor.predict_proba(manifest.frame["path"].tolist()), expected, rtol=0, atol=1e-5)


def test_unknown_models_raise_model_not_found_naming_what_exists(trained_state, tmp_path):
    assert issubclass(ModelNotFound, ValueError)
    _, uri = log_trained(trained_state)
    with pytest.raises(ModelNotFound, match=r"registered: none"):
        load_predictor("models:/skinclr@champion")
    mlflow.register_model(uri, "skinclr")
    tracking.client().set_registered_model_alias("skinclr", "candidate", "1")
    with pytest.raises(ModelNotFound, match=r"'models:/skinclr@champion'.*registered: skinclr \(versions 1; "
                                            r"aliases @candidate->v1\)"):
        load_predictor("models:/skinclr@champion")
    with pytest.raises(ModelNotFound, match=r"'models:/skinclr/7'.*versions 1"):
        load_predictor("models:/skinclr/7")

    pretrain = RunLogger.create("skinclr-pretrain", "no model here")
    (tmp_path / "backbone_best.pt").write_bytes(b"")
    pretrain.log_artifact(tmp_path / "backbone_best.pt", "checkpoints")
    with pytest.raises(ModelNotFound, match=r"has no 'model' artifact \(it has: checkpoints\)"):
        load_predictor(f"runs:/{pretrain.run_id}")
    with pytest.raises(ModelNotFound, match="no run '0123456789abcdef'"):
        load_predictor("runs:/0123456789abcdef/model")
    with pytest.raises(ModelNotFound, match="no such file or folder"):
        load_predictor(tmp_path / "missing.pt")
    with pytest.raises(ModelNotFound, match="not a skinclr model folder"):
        load_predictor(tmp_path)


def test_a_local_store_answers_a_missing_model_without_mlflow_as_mlflow_would(trained_state, monkeypatch):
    """The SQLite fast path (plain SQL, no MLflow import) says what MLflow's own lookup says."""
    from skinclr.serve import uris

    _, uri = log_trained(trained_state)
    name = "skinclr-fast-path"
    mlflow.register_model(uri, name)
    tracking.client().set_registered_model_alias(name, "candidate", "1")
    wrong = [f"models:/{name}@champion", f"models:/{name}/9", "models:/no-such-model@champion",
             "runs:/0123456789abcdef0123456789abcdef/model"]

    def answers() -> list[str]:
        out = []
        for bad in wrong:
            with pytest.raises(ModelNotFound) as err:
                uris.locate_model(bad)
            out.append(str(err.value))
        return out

    fast = answers()
    assert all(uris._absent_from_sqlite(bad) for bad in wrong)
    assert f"{name} (versions 1; aliases @candidate->v1)" in fast[0]
    monkeypatch.setattr(uris, "_absent_from_sqlite", lambda uri: "")
    assert answers() == fast
    assert uris.locate_model(f"models:/{name}@candidate")[1] == uris.locate_model(f"models:/{name}/1")[1]


def test_a_model_saved_with_tta_predicts_and_serves_with_it_unless_told_otherwise(trained_state, labelled_dir,
                                                                                 tmp_path):
    """TTA is a model property: the pyfunc (what the REST server runs) averages over the views it was
    saved with; `tta=` overrides it; a model saved before TTA existed predicts with none."""
    from skinclr.serve.predictor import Predictor

    paths = image_paths(labelled_dir)[:6]
    folder = save_pyfunc(tmp_path / "d4", trained_state, "resnet18", SIZE, "center_crop", tta="d4")
    assert json.loads((folder / "artifacts" / "meta.json").read_text())["tta"] == "d4"
    served = mlflow.pyfunc.load_model(str(folder)).predict(pd.DataFrame({"image": paths}))[list(CLASSES)].to_numpy()
    d4, none = load_predictor(folder), load_predictor(folder, tta="none")
    assert d4.tta == "d4" and none.tta == "none"
    np.testing.assert_allclose(served, d4.predict_proba(paths), atol=1e-9)
    assert np.abs(served - none.predict_proba(paths)).max() > 1e-4

    meta = json.loads((folder / "artifacts" / "meta.json").read_text())
    before = {k: v for k, v in meta.items() if k != "tta"}
    assert Predictor(trained_state, before).tta == "none"
    with pytest.raises(ModelError, match="test-time augmentation 'd16'"):
        Predictor(trained_state, {**meta, "tta": "d16"})


def test_unreadable_inputs_raise_one_data_error_naming_each_culprit(trained_state, labelled_dir, tmp_path):
    predictor = load_predictor(save_pyfunc(tmp_path / "model", trained_state, "resnet18", SIZE, "center_crop"))
    good = image_paths(labelled_dir)[0]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(Path(good).read_bytes()[:600])
    missing = tmp_path / "missing.jpg"
    with pytest.raises(DataError) as err:
        predictor.predict_proba([str(broken), good, str(missing)])
    assert len(err.value.problems) == 2
    assert "broken.jpg: cannot decode image" in err.value.problems[0]
    assert "missing.jpg: file does not exist" in err.value.problems[1]

    cases = [(["aGVsbG8gd29ybGQ="], r"image 0 \(base64, 16 characters\): not a readable image"),
             ([np.zeros((8, 8, 3), np.float32)], "uint8 HxWx3"),
             ([{"pixels": 1}], "a dict; give a file path"),
             (pd.DataFrame({"path": [good]}), "column 'image'"),
             ([], "no images")]
    for images, message in cases:
        with pytest.raises(DataError, match=message):
            predictor.predict_proba(images)


def test_saving_refuses_weights_that_do_not_fit(trained_state, tmp_path):
    with pytest.raises(ModelError, match="resnet50"):
        save_pyfunc(tmp_path / "a", trained_state, "resnet50", SIZE, "center_crop")
    with pytest.raises(ModelError, match="aspect 'squash'"):
        save_pyfunc(tmp_path / "b", trained_state, "resnet18", SIZE, "squash")


def test_a_file_that_is_not_plain_weights_is_refused_in_one_line(tmp_path):
    """A random file, a damaged one, or a pickle of other objects: one line, never torch's advice to
    load untrusted code."""
    import collections
    import pickle

    (tmp_path / "random.pt").write_bytes(np.random.default_rng(0).bytes(3000))
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"w": torch.zeros(3)}, tmp_path / "whole.pt")
    whole = (tmp_path / "whole.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(whole[:len(whole) // 2])
    (tmp_path / "objects.pt").write_bytes(pickle.dumps({"w": collections.OrderedDict(a=object)}))
    for name in ("random.pt", "empty.pt", "truncated.pt", "objects.pt"):
        with pytest.raises(ModelError) as err:
            load_predictor(tmp_path / name)
        text = str(err.value)
        assert name in text and "\n" not in text and "weights_only" not in text, text


def test_a_better_epoch_replaces_the_runs_logged_model_which_says_what_it_takes_and_gives(trained_state, labelled_dir,
                                                                                          tmp_path):
    """One model per run, the latest: the Models tab lists it with its epoch's metrics, its
    signature names the base64 image column and the seven classes, its example is a real image."""
    paths = image_paths(labelled_dir)
    logger = RunLogger.create("skinclr-finetune", "two best epochs")
    first = build_classifier("resnet18").state_dict()
    logger.log_metrics({"val_balanced_accuracy": 0.2}, step=1)
    log_model(logger, first, "resnet18", SIZE, "center_crop", example=paths[0], step=1)
    c = tracking.client()
    replaced = c.get_run(logger.run_id).outputs.model_outputs[0].model_id
    replaced_files = Path(c.get_logged_model(replaced).artifact_location.removeprefix("file:"))
    assert any(replaced_files.rglob("classifier.pt"))
    logger.log_metrics({"val_balanced_accuracy": 0.4}, step=2)
    uri = log_model(logger, trained_state, "resnet18", SIZE, "center_crop", example=paths[0], step=2)
    logger.end()

    live = c.search_logged_models([c.get_run(logger.run_id).info.experiment_id],
                                  filter_string=f"source_run_id = '{logger.run_id}'")
    assert len(live) == 1 and live[0].model_id != replaced and live[0].name == "model"
    assert [(m.key, m.value, m.step) for m in live[0].metrics] == [("val_balanced_accuracy", 0.4, 2)]
    with pytest.raises(mlflow.exceptions.MlflowException):
        c.get_logged_model(replaced)  # deleted, its weights with it
    assert not any(replaced_files.rglob("classifier.pt"))
    np.testing.assert_array_equal(load_predictor(uri).predict_proba(paths),
                                  load_predictor(save_pyfunc(tmp_path / "m", trained_state, "resnet18", SIZE,
                                                             "center_crop")).predict_proba(paths))

    folder = Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path / "dl")))
    meta = mlflow.models.Model.load(folder)
    assert meta.signature.inputs.to_dict() == [{"type": "string", "name": "image", "required": True}]
    assert [col["name"] for col in meta.signature.outputs.to_dict()] == list(CLASSES)
    example = meta.load_input_example(str(folder))
    shipped = Image.open(io.BytesIO(base64.b64decode(example["image"][0])))
    assert shipped.size == Image.open(paths[0]).size  # the real image (200x150: under 256 px, kept whole)
