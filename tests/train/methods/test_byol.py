"""BYOL: the cosine momentum schedule, the EMA target, and the symmetric loss."""
from __future__ import annotations

import math

import pytest
import torch

from skinclr.train.losses import byol_loss
from skinclr.train.methods.byol import cosine_momentum, targets


def test_cosine_schedule_runs_from_the_base_rate_to_one():
    assert cosine_momentum(0.99, 0, 100) == pytest.approx(0.99)
    assert cosine_momentum(0.99, 50, 100) == pytest.approx(0.995)  # halfway up the half cosine
    assert cosine_momentum(0.99, 100, 100) == pytest.approx(1.0)
    assert cosine_momentum(0.99, 25, 100) == pytest.approx(1 - 0.01 * (math.cos(math.pi / 4) + 1) / 2)
    values = [cosine_momentum(0.9, k, 10) for k in range(11)]
    assert values == sorted(values)


def test_a_step_moves_the_target_by_the_scheduled_rate(method_on_synth, take_step):
    task, optimizer = method_on_synth("byol", "byol.momentum=0.9", "train.epochs=3")
    m = task.model
    assert task.steps_per_epoch() == 2  # capped by train.max_steps_per_epoch: 6 steps in the run
    assert not any(p.requires_grad for p in [*m.target_backbone.parameters(), *m.target_projector.parameters()])
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in [*m.backbone.parameters(), *m.projector.parameters(),
                                         *m.predictor.parameters()]}
    assert any(isinstance(layer, torch.nn.BatchNorm1d) for layer in m.predictor)

    batches = iter(task.batches(1))
    take_step(task, optimizer, next(batches))  # step 0: rate 0.9
    target_before = [p.clone() for p in m.target_projector.parameters()]
    take_step(task, optimizer, next(batches))  # step 1: rate cosine_momentum(0.9, 1, 6)
    tau = cosine_momentum(0.9, 1, 6)
    for t, t0, o in zip(m.target_projector.parameters(), target_before, m.projector.parameters()):
        torch.testing.assert_close(t, tau * t0 + (1 - tau) * o.detach())
    assert int(m.step) == 2 and "step" in m.state_dict()  # the schedule's position is saved with the model


def test_loss_predicts_each_view_from_the_other(method_on_synth):
    task, _ = method_on_synth("byol")
    batch = next(iter(task.batches(1)))
    (v1, v2), _ = batch
    task.model.eval()
    loss, _ = task.loss(batch)
    with torch.no_grad():
        p1, p2 = task.net(v1), task.net(v2)
        z1, z2 = targets(task.model, v1), targets(task.model, v2)
    torch.testing.assert_close(loss.detach(), byol_loss(p1, z2) + byol_loss(p2, z1))
    assert 0.0 <= loss.item() <= 8.0
