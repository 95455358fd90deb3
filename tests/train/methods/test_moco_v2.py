"""MoCo v2: the queue, the momentum key encoder, and what one step does to both."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from skinclr.train.losses import info_nce
from skinclr.train.methods.moco_v2 import enqueue, keys, network


def test_queue_is_a_ring_buffer_that_overwrites_the_oldest_keys():
    net = network("resnet18", 16, 4, queue_size=5)
    keys = F.normalize(torch.arange(1.0, 33.0).reshape(8, 4), dim=1)
    enqueue(net, keys[:3])
    torch.testing.assert_close(net.queue[:3], keys[:3])
    enqueue(net, keys[3:6])  # wraps: slots 3, 4, then 0
    torch.testing.assert_close(net.queue[[3, 4, 0]], keys[3:6])
    torch.testing.assert_close(net.queue[[1, 2]], keys[1:3])
    assert int(net.queue_ptr) == 1
    enqueue(net, keys)  # more keys than slots: the newest five, oldest first from the pointer on
    torch.testing.assert_close(net.queue[[1, 2, 3, 4, 0]], keys[3:])
    assert int(net.queue_ptr) == 1
    assert {"queue", "queue_ptr"} <= set(net.state_dict())  # saved with the model, so resumes are exact


def test_a_step_moves_the_key_encoder_by_its_momentum_and_enqueues_the_keys(method_on_synth, take_step):
    task, optimizer = method_on_synth("moco_v2", "moco_v2.momentum=0.9", "moco_v2.queue_size=40")
    m = task.model
    assert not any(p.requires_grad for p in [*m.key_backbone.parameters(), *m.key_projector.parameters()])
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in [*m.backbone.parameters(), *m.projector.parameters()]}
    key_before = [p.clone() for p in m.key_backbone.parameters()]
    torch.testing.assert_close(key_before, [p.detach() for p in m.backbone.parameters()])  # starts as a copy

    batch = next(iter(task.batches(1)))
    take_step(task, optimizer, batch)
    for k, k0, q in zip(m.key_backbone.parameters(), key_before, m.backbone.parameters()):
        torch.testing.assert_close(k, 0.9 * k0 + 0.1 * q.detach())
    assert all(p.grad is None for p in m.key_backbone.parameters())  # keys carry no gradient
    assert int(m.queue_ptr) == 16  # both views' keys of the 8 images
    torch.testing.assert_close(m.queue[:16], task.new_keys)
    torch.testing.assert_close(m.queue[:16].norm(dim=1), torch.ones(16))


def test_loss_is_the_mean_of_both_directions(method_on_synth):
    task, _ = method_on_synth("moco_v2", "moco_v2.temperature=0.3")
    batch = next(iter(task.batches(1)))
    (v1, v2), _ = batch
    task.model.eval()  # batch statistics would differ between one forward of both views and two
    loss, n = task.loss(batch)
    with torch.no_grad():
        q1, q2 = task.net(v1), task.net(v2)
        k1, k2 = keys(task.model, v1), keys(task.model, v2)
    queue = task.model.queue
    expected = (info_nce(q1, k2, queue, 0.3) + info_nce(q2, k1, queue, 0.3)) / 2
    assert n == 8
    torch.testing.assert_close(loss.detach(), expected)
