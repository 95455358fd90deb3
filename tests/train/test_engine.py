"""The engine as a unit, on a task small enough to check by hand: least squares on fixed tensors."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from skinclr.config import TrainConfig
from skinclr.train.engine import TTA_VIEWS, Task, infer, run, step_precision, views

W = torch.tensor([1.0, -2.0, 0.5])


def data(n=40):
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(1))
    return x, x @ W


class LeastSquares(Task):
    """Linear regression; batches drawn from the global RNG, so an exact resume must restore it."""

    def __init__(self, batch_size=8, stop_at=0):
        self.batch_size, self.stop_at = batch_size, stop_at
        self.x, self.y = data()

    def setup(self, device, resume):
        self.model = nn.Linear(3, 1)  # initialised from the seeded global RNG
        self.steps_taken = resume["steps_taken"] if resume else 0
        return torch.optim.SGD(self.model.parameters(), lr=0.05)

    def batches(self, epoch):
        order = torch.randperm(len(self.x))
        return [(self.x[i], self.y[i]) for i in order.split(self.batch_size)]

    def loss(self, batch):
        x, y = batch
        return F.mse_loss(self.model(x).squeeze(1), y), len(y)

    def after_step(self):
        self.steps_taken += 1

    def evaluate(self, epoch, metrics):
        with torch.no_grad():
            metrics["val_loss"] = F.mse_loss(self.model(self.x).squeeze(1), self.y).item()
        return {"stop": epoch == self.stop_at}

    def state(self):
        return {"steps_taken": self.steps_taken}


def train(epochs, **task_args):
    return TrainConfig(epochs=epochs, seed=3, device="cpu", **task_args)


def plain_loop(epochs):
    """The same training written out by hand: what the engine must reproduce number for number."""
    torch.manual_seed(3)
    x, y = data()
    model = nn.Linear(3, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    losses = []
    for _ in range(epochs):
        total, seen = 0.0, 0
        for i in torch.randperm(len(x)).split(8):
            loss = F.mse_loss(model(x[i]).squeeze(1), y[i])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total, seen = total + loss.item() * len(i), seen + len(i)
        losses.append(total / seen)
    return losses, model


def test_engine_reproduces_a_hand_written_loop():
    task = LeastSquares()
    records = list(run(task, train(3)))
    losses, model = plain_loop(3)
    assert [r.epoch for r in records] == [1, 2, 3]
    assert [r.metrics["train_loss"] for r in records] == pytest.approx(losses, rel=1e-6)
    assert torch.allclose(task.model.weight, model.weight) and task.steps_taken == 15  # 40 rows / 8, 3 epochs
    m = records[-1].metrics
    assert {"train_loss", "lr", "images_per_second", "epoch_seconds", "val_loss"} <= set(m)
    assert m["lr"] == 0.05 and m["images_per_second"] > 0 and m["epoch_seconds"] > 0
    assert records[-1].metrics["val_loss"] < records[0].metrics["val_loss"]


def test_step_cap_counts_only_the_steps_taken():
    task = LeastSquares()
    records = list(run(task, train(2, max_steps_per_epoch=2)))
    assert task.steps_taken == 4
    assert all(r.metrics["train_loss"] > 0 for r in records)


def test_resume_from_a_saved_state_equals_the_uninterrupted_run():
    straight = list(run(LeastSquares(), train(4)))
    first = run(LeastSquares(), train(4))
    saved = io.BytesIO()
    torch.save(next(first).state(), saved)  # as a driver checkpoints, and the process then dies
    saved.seek(0)
    task = LeastSquares()
    resumed = list(run(task, train(4), resume=torch.load(saved, weights_only=True)))
    assert [r.epoch for r in resumed] == [2, 3, 4]
    assert [r.metrics["train_loss"] for r in resumed] == [r.metrics["train_loss"] for r in straight[1:]]
    assert task.steps_taken == 20  # the task's own state came back too


def test_a_stop_ends_the_loop_after_its_record():
    records = list(run(LeastSquares(stop_at=2), train(10)))
    assert [r.epoch for r in records] == [1, 2] and records[-1].stop


class Recorder(LeastSquares):
    """Least squares that notes the dtype its forward computes in, step by step."""

    def loss(self, batch):
        x, y = batch
        out = self.model(x).squeeze(1)
        self.dtypes.add(out.dtype)
        return F.mse_loss(out.float(), y), len(y)


@pytest.mark.parametrize("precision, dtype", [("auto", torch.float32), ("fp32", torch.float32),
                                              ("bf16", torch.bfloat16)])
def test_train_precision_sets_the_steps_compute_dtype_on_the_cpu_and_training_still_learns(precision, dtype):
    task = Recorder()
    task.dtypes = set()
    records = list(run(task, train(3, precision=precision)))
    assert task.dtypes == {dtype}
    assert task.model.weight.dtype == torch.float32  # autocast: the weights and the optimizer stay float32
    assert records[-1].metrics["val_loss"] < records[0].metrics["val_loss"] / 2


@pytest.mark.parametrize("device, asked, size, units, runs", [
    ("cpu", "auto", 128, True, "bf16"), ("cpu", "auto", 64, True, "bf16"),  # AMX: 2.4x, 1.5x faster
    ("cpu", "auto", 32, True, "fp32"), ("cpu", "auto", None, True, "fp32"),  # small or unknown: slower
    ("cpu", "auto", 128, False, "fp32"), ("cpu", "auto", 128, None, "fp32"),  # emulated bf16: 11-17x slower
    ("cuda", "auto", 32, False, "bf16"),
    ("cpu", "fp32", 128, True, "fp32"), ("cpu", "bf16", 32, False, "bf16"),  # asked for: given
])
def test_auto_precision_is_bf16_only_where_it_was_measured_faster(monkeypatch, device, asked, size, units, runs):
    from skinclr.train import engine

    monkeypatch.setattr(engine, "cpu_bf16_units", lambda: units)
    assert step_precision(torch.device(device), asked, size) == runs


@pytest.mark.parametrize("units, dtype", [(True, torch.bfloat16), (False, torch.float32)])
def test_a_run_at_64px_steps_in_bf16_by_default_only_on_a_cpu_with_bf16_units(monkeypatch, units, dtype):
    from skinclr.train import engine

    monkeypatch.setattr(engine, "cpu_bf16_units", lambda: units)
    task = Recorder()
    task.dtypes = set()
    list(run(task, train(1), image_size=64))
    assert task.dtypes == {dtype}


def test_bf16_on_a_cpu_without_bf16_units_says_it_trains_slower(monkeypatch, capsys):
    from skinclr.train import engine

    monkeypatch.setattr(engine, "cpu_bf16_units", lambda: False)
    list(run(LeastSquares(), train(1, precision="bf16")))
    assert "train.precision=bf16 on a CPU without bf16 units" in capsys.readouterr().err
    monkeypatch.setattr(engine, "cpu_bf16_units", lambda: True)
    list(run(LeastSquares(), train(1, precision="bf16")))
    assert capsys.readouterr().err == ""


def test_a_bad_precision_is_a_config_error_naming_the_key():
    from skinclr.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="train.precision"):
        load_config(None, ["train.precision=fp16"])


def test_infer_returns_float32_outputs_in_order_and_restores_the_mode():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten())
    x = torch.randn(10, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    net.train()
    out = infer(net, [(x[:4], None), (x[4:], None)], torch.device("cpu"))
    assert net.training and out.dtype == torch.float32 and not out.requires_grad
    net.eval()
    with torch.no_grad():
        torch.testing.assert_close(out, net(x))  # eval mode: BatchNorm used its running statistics
    assert torch.equal(infer(net, [x[:4], x[4:]], torch.device("cpu")), out)  # bare image batches too
    assert not net.training


class NoBatches(LeastSquares):
    """A task whose every batch is dropped: what a train side smaller than one batch gives."""

    def batches(self, epoch):
        return []


def test_an_epoch_without_an_optimizer_step_fails_the_run():
    from skinclr.config import ConfigError

    with pytest.raises(ConfigError, match="made no optimizer step"):
        list(run(NoBatches(), train(2)))


def test_tta_views_are_the_rotations_and_flips_of_the_square():
    x = torch.arange(2 * 3 * 5 * 5, dtype=torch.float32).reshape(2, 3, 5, 5)  # no symmetry at all
    d4 = views(x, "d4")
    rotations = [torch.rot90(x, k, dims=(2, 3)) for k in range(4)]
    expected = rotations + [r.flip(3) for r in rotations]
    as_keys = lambda ts: sorted(t.numpy().tobytes() for t in ts)  # noqa: E731
    assert len(d4) == TTA_VIEWS["d4"] == 8 and as_keys(d4) == as_keys(expected)  # the dihedral group, each once
    flips = views(x, "flip")
    assert len(flips) == TTA_VIEWS["flip"] == 4 and set(as_keys(flips)) <= set(as_keys(d4))
    assert torch.equal(views(x, "none")[0], x) and torch.equal(flips[0], x)


def test_tta_of_a_model_that_cannot_tell_the_views_apart_equals_no_tta():
    """A model invariant under the square's symmetries (here: global pooling, then a linear head)
    gives the same probabilities with every TTA; an ordinary one does not."""
    torch.manual_seed(0)
    symmetric = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 7))
    ordinary = nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 7))
    x = torch.rand(6, 3, 8, 8)
    cpu = torch.device("cpu")
    plain = infer(symmetric, [x], cpu).softmax(1)
    for tta in ("flip", "d4"):
        torch.testing.assert_close(infer(symmetric, [x], cpu, tta).softmax(1), plain, rtol=0, atol=1e-6)
        averaged = torch.stack([ordinary(v).softmax(1) for v in views(x, tta)]).mean(0)
        torch.testing.assert_close(infer(ordinary, [x], cpu, tta).softmax(1), averaged, rtol=0, atol=1e-6)
        assert not torch.allclose(infer(ordinary, [x], cpu, tta).softmax(1), infer(ordinary, [x], cpu).softmax(1))
