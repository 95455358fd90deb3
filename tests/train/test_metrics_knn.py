"""The kNN monitor on constructed features."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from skinclr.train.metrics import knn_balanced_accuracy


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
