"""A pretraining method set up on the synthetic data, ready to take steps by hand."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from skinclr.config import load_config
from skinclr.data.inputs import resolve_inputs
from skinclr.train.methods import METHODS

CONFIG = Path(__file__).resolve().parents[3] / "experiments" / "paper" / "simclr_pretrain.yaml"


def tiny_config(root, method: str, *extra: str):
    sets = [f"data.root={root}", "data.image_size=32", "data.workers=0", "train.batch_size=8", "train.epochs=2",
            "train.max_steps_per_epoch=2", "train.device=cpu", "monitor.k=5", "monitor.max_bank=60",
            "model.proj_hidden=32", "model.proj_dim=16", f"pretrain.method={method}", *extra]
    return load_config(CONFIG, sets)


@pytest.fixture
def method_on_synth(synth_dir):
    """`make(name, *overrides)` -> (method task after setup, its optimizer), seeded as the engine seeds."""

    def make(name: str, *extra: str):
        cfg = tiny_config(synth_dir, name, *extra)
        task = METHODS[name](cfg, resolve_inputs(cfg, progress=False))
        torch.manual_seed(cfg.train.seed)
        return task, task.setup(torch.device("cpu"), None)

    return make


@pytest.fixture
def take_step():
    """One optimizer step of a method, as the engine takes it."""

    def step(task, optimizer, batch):
        loss, _ = task.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        task.after_step()
        return loss

    return step
