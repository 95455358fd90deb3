"""SimCLR on the engine: its loss, in one process and over the global batch of two."""
from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from skinclr.data.inputs import resolve_inputs
from skinclr.train.losses import nt_xent
from skinclr.train.methods import METHODS
from skinclr.train.methods.base import Pretraining
from tests.train.methods.conftest import tiny_config


def test_loss_is_nt_xent_of_the_two_views_projections(method_on_synth):
    task, _ = method_on_synth("simclr", "simclr.temperature=0.3")
    batch = next(iter(task.batches(1)))
    (v1, v2), _ = batch
    task.model.eval()
    loss, n = task.loss(batch)
    with torch.no_grad():
        expected = nt_xent(task.model(v1), task.model(v2), 0.3)
    assert n == 8
    torch.testing.assert_close(loss.detach(), expected)


def _views(n=8):
    g = torch.Generator().manual_seed(5)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randn(n, 3, 32, 32, generator=g)


def _method(root, distributed: bool) -> Pretraining:
    cfg = tiny_config(root, "simclr")
    task = METHODS["simclr"](cfg, resolve_inputs(cfg, progress=False), distributed=distributed)
    torch.manual_seed(cfg.train.seed)
    task.setup(torch.device("cpu"), None)
    task.model.eval()  # per-image outputs: the global batch's loss must not depend on how it is split
    return task


def _loss_and_grads(task, v1, v2):
    loss, _ = task.loss(((v1, v2), None))
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in task.model.parameters()]


def _rank_main(rank: int, world: int, store: str, root: str, cache: str) -> None:
    import os

    os.environ["SKINCLR_CACHE"] = cache
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        v1, v2 = _views()
        ref_loss, ref_grads = _loss_and_grads(_method(root, distributed=False), v1, v2)
        task = _method(root, distributed=True)
        assert (task.rank, task.world) == (rank, world)
        half = slice(rank * 4, rank * 4 + 4)
        loss, grads = _loss_and_grads(task, v1[half], v2[half])
        torch.testing.assert_close(loss, ref_loss)  # negatives from both processes
        for g, ref in zip(grads, ref_grads):  # DDP's average of the ranks' grads: the whole batch's
            torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-6)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_take_the_step_of_one_process_on_the_whole_batch(synth_dir, tmp_path):
    import os

    resolve_inputs(tiny_config(synth_dir, "simclr"), progress=False)  # build the cache once, here
    mp.spawn(_rank_main, args=(2, str(tmp_path / "store"), str(synth_dir), os.environ["SKINCLR_CACHE"]),
             nprocs=2, join=True)
