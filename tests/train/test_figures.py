"""The figures: PNG files of the expected shape, also from histories with gaps."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from skinclr.train.figures import (_scale_axis, plot_accuracy_curves, plot_confusion_matrix, plot_loss_curves,
                                   plot_parallel_coordinates)
from skinclr.train.metrics import classification_metrics
from tests.train.test_metrics import TABLE, _from_table


@pytest.fixture()
def hand():
    return classification_metrics(*_from_table(TABLE))


def _assert_png(path, min_width=400, min_height=250):
    assert path.is_file() and path.stat().st_size > 5_000
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert min_width <= im.width <= 4000 and min_height <= im.height <= 4000
        return im.size


def test_confusion_figure_has_two_panels(hand, tmp_path):
    width, height = _assert_png(plot_confusion_matrix(hand, tmp_path / "fig3.png", title="test"))
    assert width > 1.6 * height  # counts and normalized side by side


def test_curves_skip_missing_keys(tmp_path):
    history = [
        {"epoch": 1, "train_loss": 2.0, "val_loss": 1.9, "val_accuracy": 0.6, "val_balanced_accuracy": 0.3},
        {"epoch": 2, "train_loss": 1.5},  # no validation this epoch
        {"epoch": 3, "train_loss": 1.2, "val_loss": float("nan"), "val_accuracy": 0.7},
        {"epoch": 4, "train_loss": 1.0, "val_loss": 1.1, "val_accuracy": 0.75, "val_balanced_accuracy": 0.45},
    ]
    _assert_png(plot_loss_curves(history, tmp_path / "fig1.png"))
    _assert_png(plot_accuracy_curves(history, tmp_path / "fig2.png"))
    # a pretraining history has no validation accuracies at all: still a figure, not a crash
    _assert_png(plot_accuracy_curves([{"epoch": 1, "train_loss": 5.0}], tmp_path / "empty.png"))
    with pytest.raises(ValueError, match="'epoch'"):
        plot_loss_curves([{"train_loss": 1.0}], tmp_path / "bad.png")


def test_parallel_coordinates_log_and_categorical_axes(tmp_path):
    rng = np.random.default_rng(0)
    frame = pd.DataFrame({
        "lr": 10 ** rng.uniform(-5, -1, 12),                  # spans 4 decades -> log axis
        "batch_size": rng.choice([64, 128, 256], 12),          # spans < 1 decade -> linear
        "optimizer": rng.choice(["adam", "sgd", "lars"], 12),  # categorical
        "temperature": [str(t) for t in rng.uniform(0.1, 0.5, 12)],  # MLflow params are strings
        "seed": 0,                                              # constant: not an axis by default
        "val_balanced_accuracy": rng.uniform(0.3, 0.7, 12),
    })
    frame.loc[3, "val_balanced_accuracy"] = np.nan  # a failed trial
    _assert_png(plot_parallel_coordinates(frame, "val_balanced_accuracy", tmp_path / "pc.png"))
    _assert_png(plot_parallel_coordinates(frame, "val_balanced_accuracy", tmp_path / "pc2.png", params=["lr", "optimizer"]))
    with pytest.raises(ValueError, match="'val_loss'"):
        plot_parallel_coordinates(frame, "val_loss", tmp_path / "x.png")
    with pytest.raises(ValueError, match="momentum"):
        plot_parallel_coordinates(frame, "val_balanced_accuracy", tmp_path / "x.png", params=["momentum"])


def test_axis_scaling_rules():
    pos, ticks, scale = _scale_axis(pd.Series([1e-5, 1e-3, 1e-1]))
    assert scale == "log" and pos == pytest.approx([0, 0.5, 1])
    pos, _, scale = _scale_axis(pd.Series(["64", "128", "256"]))
    assert scale == "linear" and pos == pytest.approx([0, 1 / 3, 1])
    pos, ticks, scale = _scale_axis(pd.Series(["sgd", "adam", "sgd"]))
    assert scale == "categorical" and pos == pytest.approx([1, 0, 1])
    assert [label for _, label in ticks] == ["adam", "sgd"]
