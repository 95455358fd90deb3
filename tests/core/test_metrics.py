"""Metrics against numbers worked out by hand, the kNN monitor on constructed features, and the figures."""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from core.metrics import (
    CLASSES,
    _scale_axis,
    classification_metrics,
    knn_balanced_accuracy,
    mean_std,
    plot_accuracy_curves,
    plot_confusion_matrix,
    plot_loss_curves,
    plot_parallel_coordinates,
    report_frame,
    report_text,
    write_confusion_csv,
)

# Rows = true class, columns = predicted class, over all 7 classes. Only MEL, NV and BCC occur
# in the data; one NV image is predicted DF, a class with no true samples.
#            MEL NV BCC AKIEC BKL DF VASC
TABLE = [
    [6, 3, 1, 0, 0, 0, 0],   # MEL  support 10, recall 6/10  = 0.6
    [1, 18, 0, 0, 0, 1, 0],  # NV   support 20, recall 18/20 = 0.9
    [0, 2, 3, 0, 0, 0, 0],   # BCC  support 5,  recall 3/5   = 0.6
    [0] * 7, [0] * 7, [0] * 7, [0] * 7,
]
# accuracy          = (6 + 18 + 3) / 35 = 27/35 = 0.771428...
# balanced accuracy = (0.6 + 0.9 + 0.6) / 3 = 0.7   (mean recall over the 3 PRESENT classes)
# precision (column sums): MEL 6/7, NV 18/23, BCC 3/4
# f1 = 2TP / (2TP + FP + FN): MEL 12/(12+1+4) = 12/17, NV 36/(36+5+2) = 36/43, BCC 6/(6+1+2) = 2/3


def _from_table(table):
    """y_true and probabilities whose argmax reproduces `table` cell by cell."""
    y_true, probs = [], []
    c = len(table)
    for t, row in enumerate(table):
        for p, count in enumerate(row):
            for _ in range(count):
                y_true.append(t)
                probs.append(np.full(c, 0.3 / (c - 1)))
                probs[-1][p] = 0.7
    return np.array(y_true), np.array(probs)


@pytest.fixture()
def hand():
    y, p = _from_table(TABLE)
    return classification_metrics(y, p)


def test_balanced_accuracy_and_accuracy_match_hand_values_and_differ(hand):
    assert hand["num_samples"] == 35
    assert hand["accuracy"] == pytest.approx(27 / 35)
    assert hand["balanced_accuracy"] == pytest.approx(0.7)
    assert abs(hand["accuracy"] - hand["balanced_accuracy"]) > 0.05
    pc = hand["per_class"]
    assert [pc[c]["recall"] for c in ("MEL", "NV", "BCC")] == pytest.approx([0.6, 0.9, 0.6])
    assert [pc[c]["precision"] for c in ("MEL", "NV", "BCC")] == pytest.approx([6 / 7, 18 / 23, 3 / 4])
    assert [pc[c]["f1"] for c in ("MEL", "NV", "BCC")] == pytest.approx([12 / 17, 36 / 43, 2 / 3])
    assert hand["macro_f1"] == pytest.approx((12 / 17 + 36 / 43 + 2 / 3) / 3)
    assert [pc[c]["support"] for c in CLASSES] == [10, 20, 5, 0, 0, 0, 0]
    assert hand["confusion_matrix"] == TABLE
    json.dumps(hand)  # logged and written as JSON as is


def test_absent_classes_have_no_scores_and_zero_rows(hand):
    for name in ("AKIEC", "BKL", "DF", "VASC"):
        assert hand["per_class"][name] == {"precision": None, "recall": None, "f1": None,
                                           "support": 0, "roc_auc": None}
    # the false DF alarm stays visible in the DF column
    assert [row[CLASSES.index("DF")] for row in hand["confusion_matrix"]] == [0, 1, 0, 0, 0, 0, 0]
    sums = np.array(hand["confusion_matrix_normalized"]).sum(axis=1)
    assert sums == pytest.approx([1, 1, 1, 0, 0, 0, 0])
    assert hand["confusion_matrix_normalized"][1][1] == pytest.approx(0.9)


def test_roc_auc_one_vs_rest_hand_example():
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.60, 0.30, 0.10],
                      [0.55, 0.40, 0.05],
                      [0.50, 0.35, 0.15],
                      [0.10, 0.80, 0.10]])
    m = classification_metrics(y, probs, classes=("A", "B", "C"))
    # A: positives score 0.60, 0.55; negatives 0.50, 0.10 -> every pair ordered right: 4/4 = 1.0
    # B: positives 0.35, 0.80; negatives 0.30, 0.40 -> (0.35>0.30, 0.35<0.40, 0.80>both) = 3/4
    # C: no positives -> undefined; the macro mean skips it: (1.0 + 0.75) / 2
    assert m["per_class"]["A"]["roc_auc"] == pytest.approx(1.0)
    assert m["per_class"]["B"]["roc_auc"] == pytest.approx(0.75)
    assert m["per_class"]["C"]["roc_auc"] is None
    assert m["roc_auc_macro"] == pytest.approx(0.875)


def test_roc_auc_undefined_when_class_has_no_negatives():
    m = classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.6, 0.4]]), classes=("a", "b"))
    assert m["per_class"]["b"]["roc_auc"] is None
    assert m["roc_auc_macro"] is None
    assert m["balanced_accuracy"] == pytest.approx(0.5) and m["accuracy"] == pytest.approx(0.5)


@pytest.mark.parametrize("y, probs, match", [
    (np.array([0, 1]), np.full((2, 6), 1 / 6), r"shape \(N, C\)"),
    (np.array([0, 9]), np.full((2, 7), 1 / 7), "outside 0..6"),
    (np.array([0, 1]), np.ones((2, 7)), "softmax"),
    (np.array([0.5, 1.0]), np.full((2, 7), 1 / 7), "integer"),
])
def test_bad_input_is_named(y, probs, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(y, probs)


def test_report_frame_is_table_2(hand):
    frame = report_frame(hand)
    assert list(frame.index) == [*CLASSES, "macro avg", "weighted avg"]
    assert list(frame.columns) == ["precision", "recall", "f1", "support", "roc_auc"]
    # averages run over present classes, so they reproduce the two headline numbers
    assert frame.loc["macro avg", "recall"] == pytest.approx(hand["balanced_accuracy"])
    assert frame.loc["weighted avg", "recall"] == pytest.approx(hand["accuracy"])
    assert frame.loc["macro avg", "f1"] == pytest.approx(hand["macro_f1"])
    assert frame.loc["macro avg", "support"] == 35
    assert math.isnan(frame.loc["DF", "recall"])
    assert frame.attrs == {"balanced_accuracy": pytest.approx(0.7), "accuracy": pytest.approx(27 / 35)}

    text = report_text(hand)
    assert text.splitlines()[0] == "balanced accuracy 0.7000 | accuracy 0.7714"
    assert "weighted avg" in text and "0.9000" in text


@pytest.mark.parametrize("normalized", [False, True])
def test_confusion_csv_round_trips(hand, tmp_path, normalized):
    path = write_confusion_csv(hand, tmp_path / "cm" / "confusion.csv", normalized=normalized)
    back = pd.read_csv(path, index_col=0)
    assert back.index.name == "true"
    assert list(back.columns) == list(CLASSES) and list(back.index) == list(CLASSES)
    key = "confusion_matrix_normalized" if normalized else "confusion_matrix"
    np.testing.assert_allclose(back.to_numpy(), np.array(hand[key]))


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


def test_knn_separable_clusters_score_one():
    rng = np.random.default_rng(0)
    centres = np.eye(16)[:7] * 5
    bank_labels = np.repeat(np.arange(7), 20)
    query_labels = np.repeat(np.arange(7), 10)
    bank = centres[bank_labels] + rng.normal(0, 0.3, (140, 16))
    query = centres[query_labels] + rng.normal(0, 0.3, (70, 16))
    assert knn_balanced_accuracy(bank, bank_labels, query, query_labels) == 1.0
    # torch input gives the same answer
    assert knn_balanced_accuracy(torch.tensor(bank), torch.tensor(bank_labels), torch.tensor(query),
                                 torch.tensor(query_labels), balanced=False) == 1.0


def test_knn_balanced_vote_beats_majority_vote_on_imbalanced_bank():
    # A 90/10 bank in 3-D. Class 0: 75 points at e0 and 15 at e2. Class 1: 5 points at e1 and 5 at e2.
    # Class-0 queries sit at e0: their 20 nearest neighbours are class-0 points (sim 1), both votes say 0.
    # Class-1 queries sit at the shared region e2: their 20 nearest are exactly the 20 points at e2
    # (sim 1; every other bank point has sim 0), all with equal weight: 15 of class 0, 5 of class 1.
    #   plain vote:    15 vs 5                     -> predicts 0, class-1 recall 0   -> balanced accuracy 0.5
    #   balanced vote: 15 / 0.9 = 16.7 vs 5 / 0.1 = 50 -> predicts 1, recall 1 -> balanced accuracy 1.0
    # Half of class 1 lives at e2 against a sixth of class 0: the frequency-corrected vote is the right call.
    e = np.eye(3)
    bank = np.vstack([np.repeat(e[[0]], 75, 0), np.repeat(e[[2]], 15, 0), np.repeat(e[[1]], 5, 0), np.repeat(e[[2]], 5, 0)])
    bank_labels = np.array([0] * 90 + [1] * 10)
    query = np.vstack([np.repeat(e[[0]], 10, 0), np.repeat(e[[2]], 10, 0)])
    query_labels = np.array([0] * 10 + [1] * 10)
    plain = knn_balanced_accuracy(bank, bank_labels, query, query_labels, k=20, balanced=False, num_classes=2)
    fair = knn_balanced_accuracy(bank, bank_labels, query, query_labels, k=20, balanced=True, num_classes=2)
    assert plain == pytest.approx(0.5)
    assert fair == pytest.approx(1.0)


def test_knn_random_features_near_chance():
    # more queries than one similarity chunk, so the chunked path is exercised
    g = torch.Generator().manual_seed(0)
    bank, query = torch.randn(3000, 32, generator=g), torch.randn(1500, 32, generator=g)
    bank_labels, query_labels = torch.randint(0, 7, (3000,), generator=g), torch.randint(0, 7, (1500,), generator=g)
    score = knn_balanced_accuracy(bank, bank_labels, query, query_labels)
    assert 0.07 < score < 0.25  # chance is 1/7 = 0.143


def test_knn_bad_input_is_named():
    bank, labels = np.eye(4), np.arange(4)
    with pytest.raises(ValueError, match="one width"):
        knn_balanced_accuracy(bank, labels, np.ones((2, 3)), np.zeros(2), num_classes=4)
    with pytest.raises(ValueError, match="bank_labels must lie in 0..2"):
        knn_balanced_accuracy(bank, labels, bank, labels, num_classes=3)
    with pytest.raises(ValueError, match="k >= 1"):
        knn_balanced_accuracy(bank, labels, bank, labels, k=0, num_classes=4)


def test_mean_std():
    assert mean_std([0.5]) == (0.5, 0.0)
    mean, std = mean_std([0.6, 0.7, 0.8])
    assert mean == pytest.approx(0.7) and std == pytest.approx(0.1)  # ddof=1: sqrt(0.02 / 2)
    with pytest.raises(ValueError, match="at least one"):
        mean_std([])
