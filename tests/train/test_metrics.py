"""Metrics against numbers worked out by hand."""
from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import balanced_accuracy_score

from skinclr.train.metrics import (apply_offsets, classification_metrics, fit_offsets, fit_rule, mean_std, report_frame, report_text,
                                   write_confusion_csv)
from skinclr.names import CLASSES

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


def test_mean_std():
    assert mean_std([0.5]) == (0.5, 0.0)
    mean, std = mean_std([0.6, 0.7, 0.8])
    assert mean == pytest.approx(0.7) and std == pytest.approx(0.1)  # ddof=1: sqrt(0.02 / 2)
    with pytest.raises(ValueError, match="at least one"):
        mean_std([])


def test_the_classification_report_csv_names_its_class_column(hand, tmp_path):
    """Its first column has a header, so a table preview (the MLflow UI's) shows which row is which class."""
    report_frame(hand).to_csv(tmp_path / "report.csv")
    back = pd.read_csv(tmp_path / "report.csv")
    assert back.columns[0] == "class" and list(back["class"][:7]) == list(CLASSES)


def test_offsets_fitted_on_a_shifted_prior_problem_raise_its_balanced_accuracy():
    """A model that learnt HAM10000-like priors says the big class too often; offsets fitted on one
    sample of its predictions raise balanced accuracy on another sample it was not fitted on, and
    leave a model that needs no correction as it is."""
    rng = np.random.default_rng(0)
    prior = np.array([0.11, 0.67, 0.05, 0.03, 0.11, 0.01, 0.02])

    def sample(n):
        y = rng.integers(0, 7, n)  # every class equally often: what balanced accuracy weighs
        evidence = rng.normal(0.0, 1.0, (n, 7)) + 1.5 * np.eye(7)[y]
        logits = evidence + np.log(prior)  # the prior the model absorbed in training
        probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        return y, probs

    y_fit, p_fit = sample(3000)
    y_new, p_new = sample(3000)
    offsets = fit_offsets(y_fit, p_fit)
    before = balanced_accuracy_score(y_new, p_new.argmax(1))
    after = balanced_accuracy_score(y_new, apply_offsets(p_new, offsets).argmax(1))
    assert after > before + 0.1  # 0.1 points or more on data it never saw
    assert offsets[1] < offsets[[0, 2, 3, 4, 5, 6]].min()  # NV, the class the prior favoured, pushed down most
    np.testing.assert_allclose(apply_offsets(p_new, np.zeros(7)), p_new, atol=1e-12)
    np.testing.assert_allclose(apply_offsets(p_new, offsets).sum(1), 1.0, atol=1e-12)

    fair = np.eye(7)[y_new] * 0.9 + 0.1 / 7  # a perfect, unbiased model: nothing to correct
    np.testing.assert_array_equal(fit_offsets(y_new, fair), np.zeros(7))


def _val_and_unseen(seed: int, prior_in_logits: bool):
    """A val side of 1,600 images and 20,000 unseen ones at HAM10000's class mix, from a model that
    absorbed the prior in its logits or (trained with a balanced sampler) did not."""
    rng = np.random.default_rng(seed)
    prior = np.array([0.11, 0.67, 0.05, 0.03, 0.11, 0.01, 0.02])

    def sample(n):
        y = rng.choice(7, n, p=prior)
        logits = rng.normal(0.0, 1.0, (n, 7)) + np.eye(7)[y] + (np.log(prior) if prior_in_logits else 0.0)
        probs = np.exp(logits - logits.max(1, keepdims=True))
        return y, probs / probs.sum(1, keepdims=True)
    return sample(1600), sample(20000)


def test_the_rule_says_what_to_expect_on_unseen_images_and_is_declined_where_it_fits_noise():
    """Offsets fitted on val and judged on the same val always look better there. Over 10 draws of
    a model that needs no correction, they lower balanced accuracy on unseen images every time while
    the val number they report rises. The rule is judged on val images its offsets were not fitted
    on: its expected number is not biased upwards like the in-sample one, it is declined in part of
    these draws and loses less; where a prior needs correcting it keeps the full gain."""
    for prior_in_logits in (False, True):
        in_sample_bias, crossfit_bias, lost_in_sample, lost_kept, declined = [], [], [], [], 0
        for seed in range(10):
            (yv, pv), (yt, pt) = _val_and_unseen(seed, prior_in_logits)
            plain = balanced_accuracy_score(yt, pt.argmax(1))
            fitted = fit_offsets(yv, pv)
            unseen = balanced_accuracy_score(yt, apply_offsets(pt, fitted).argmax(1))
            in_sample_bias.append(balanced_accuracy_score(yv, apply_offsets(pv, fitted).argmax(1)) - unseen)
            lost_in_sample.append(unseen - plain)
            offsets, expected = fit_rule(yv, pv)
            unseen = balanced_accuracy_score(yt, apply_offsets(pt, offsets).argmax(1))
            crossfit_bias.append(expected - unseen)
            lost_kept.append(unseen - plain)
            declined += not offsets.any()
        assert np.mean(in_sample_bias) > 0.03 and abs(np.mean(crossfit_bias)) < 0.015
        if prior_in_logits:
            assert declined == 0 and min(lost_kept) > 0.1
        else:
            assert max(lost_in_sample) < 0  # the fault: fitted and judged on one val side
            assert declined >= 3 and np.mean(lost_kept) > np.mean(lost_in_sample)


@pytest.mark.parametrize("seed", range(6))
def test_every_number_equals_scikit_learns(seed):
    """The numpy metrics against sklearn's on random sets: absent classes, never-predicted classes,
    tied scores (probabilities rounded to 2 decimals) and skewed priors included."""
    from sklearn.metrics import (accuracy_score, confusion_matrix, precision_recall_fscore_support,
                                 roc_auc_score)
    rng = np.random.default_rng(seed)
    n, c = int(rng.integers(5, 400)), len(CLASSES)
    prior = rng.dirichlet(np.full(c, 0.5))
    y = rng.choice(c, size=n, p=prior)
    logits = rng.normal(size=(n, c)) + 2.0 * np.eye(c)[y] * rng.random()
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    probs = np.round(probs, 2) if seed % 2 else probs
    probs = probs / probs.sum(1, keepdims=True)
    m = classification_metrics(y, probs)
    pred = probs.argmax(1)
    labels = list(range(c))
    assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=labels).tolist()
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # sklearn: "y_pred contains classes not in y_true"
        assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    precision, recall, f1, support = precision_recall_fscore_support(y, pred, labels=labels, zero_division=0)
    for i, name in enumerate(CLASSES):
        got = m["per_class"][name]
        assert got["support"] == support[i]
        if support[i] == 0:
            assert got["recall"] is None and got["roc_auc"] is None
            continue
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((precision[i], recall[i], f1[i]), abs=1e-12)
        if support[i] < n:
            assert got["roc_auc"] == pytest.approx(roc_auc_score(y == i, probs[:, i]), abs=1e-12)
