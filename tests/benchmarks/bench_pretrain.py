"""Pretraining step throughput per method: the project's engine against a plain PyTorch loop of
the same method, in one run.

Both sides use the same networks, batch, cached real images and augmentation; the ratio
project/plain is the figure (goal >= 0.95): the ratio of each side's best of the repeats, and
the median of the repeats' paired ratios (each pair run back to back, so slow drifts in a shared
machine's speed cancel). The plain loops are written out here by hand, as a researcher would,
without records, monitor or checkpoints. Also reports the kNN monitor's share of a full SimCLR
epoch on the real data.

    .venv/bin/python tests/benchmarks/bench_pretrain.py [--data DIR] [--size 64] [--steps 24]
        [--repeats 3] [--methods simclr moco_v2 byol] [--no-full-epoch]
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from skinclr.train.augment import simclr_transform  # noqa: E402
from skinclr.config import load_config  # noqa: E402
from skinclr.data.inputs import make_loader, resolve_inputs  # noqa: E402
from skinclr.train.models import Projector, build_backbone, build_simclr  # noqa: E402
from skinclr.train.methods import pretrain  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "isic2018-task3-200x150"
CONFIG = REPO / "experiments" / "cpu" / "simclr_pretrain.yaml"


def two_view_batches(inputs, cfg, steps: int):
    views = simclr_transform(cfg.data.image_size, cfg.augment.crop_min)
    loader = make_loader(inputs.cache, inputs.train_rows, views, batch_size=cfg.train.batch_size, seed=0,
                         shuffle=True, drop_last=True, workers=cfg.data.workers)
    for i, ((a, b), _) in enumerate(loader):
        if i == steps:
            return
        yield torch.cat([a, b]).contiguous(memory_format=torch.channels_last), len(a)


def timed(step, batches) -> float:
    seen, t0 = 0, time.perf_counter()
    for x, n in batches:
        step(x, n)
        seen += n
    return seen / (time.perf_counter() - t0)


def plain_simclr(inputs, cfg, steps: int) -> float:
    torch.manual_seed(0)
    model = build_simclr("resnet18").to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)  # as the engine builds it
    t = cfg.simclr.temperature

    def step(x, n):
        z = F.normalize(model(x), dim=1)
        sim = z @ z.T / t
        sim.fill_diagonal_(float("-inf"))
        loss = F.cross_entropy(sim, torch.cat([torch.arange(n, 2 * n), torch.arange(n)]))
        opt.zero_grad()
        loss.backward()
        opt.step()

    return timed(step, two_view_batches(inputs, cfg, steps))


def plain_moco_v2(inputs, cfg, steps: int) -> float:
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18")
    query = torch.nn.Sequential(backbone, Projector(dim, 256, 128)).to(memory_format=torch.channels_last)
    key = copy.deepcopy(query).requires_grad_(False)
    queue = F.normalize(torch.randn(cfg.moco_v2.queue_size, 128), dim=1)
    ptr, t, m = 0, cfg.moco_v2.temperature, cfg.moco_v2.momentum
    opt = torch.optim.Adam(query.parameters(), lr=1e-3, fused=True)

    def nce(q, k):
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / t
        return F.cross_entropy(logits, torch.zeros(len(q), dtype=torch.long))

    def step(x, n):
        nonlocal ptr
        q1, q2 = F.normalize(query(x), dim=1).chunk(2)
        with torch.no_grad():
            k = F.normalize(key(x), dim=1)
        k1, k2 = k.chunk(2)
        loss = (nce(q1, k2) + nce(q2, k1)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            for pk, pq in zip(key.parameters(), query.parameters()):
                pk.mul_(m).add_(pq, alpha=1 - m)
            slots = (ptr + torch.arange(len(k))) % len(queue)
            queue[slots] = k
            ptr = (ptr + len(k)) % len(queue)

    return timed(step, two_view_batches(inputs, cfg, steps))


def plain_byol(inputs, cfg, steps: int) -> float:
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet18")
    encoder = torch.nn.Sequential(backbone, Projector(dim, 256, 128, batch_norm=True))
    online = torch.nn.Sequential(encoder, Projector(128, 256, 128, batch_norm=True)).to(memory_format=torch.channels_last)
    target = copy.deepcopy(encoder).requires_grad_(False)
    opt = torch.optim.Adam(online.parameters(), lr=1e-3, fused=True)
    total, k = steps * 10**6, 0  # as the project loop is run below: a run far longer than the steps timed

    def regress(p, z):
        return (2 - 2 * F.cosine_similarity(p, z, dim=1)).mean()

    def step(x, n):
        nonlocal k
        p1, p2 = online(x).chunk(2)
        with torch.no_grad():
            z1, z2 = target(x).chunk(2)
        loss = regress(p1, z2) + regress(p2, z1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tau = 1 - (1 - cfg.byol.momentum) * (math.cos(math.pi * k / total) + 1) / 2
        with torch.no_grad():
            for pt, po in zip(target.parameters(), encoder.parameters()):
                pt.mul_(tau).add_(po, alpha=1 - tau)
        k += 1

    return timed(step, two_view_batches(inputs, cfg, steps))


PLAIN = {"simclr": plain_simclr, "moco_v2": plain_moco_v2, "byol": plain_byol}


def project_loop(overrides: list[str], method: str, inputs, steps: int) -> float:
    cfg = load_config(CONFIG, overrides + [f"pretrain.method={method}", f"train.max_steps_per_epoch={steps}",
                                           "monitor.every=1000000", "train.epochs=1000000"])
    return next(pretrain(cfg, inputs)).metrics["images_per_second"]  # the monitor is measured apart, below


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=24)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--methods", nargs="+", default=list(PLAIN), choices=list(PLAIN))
    ap.add_argument("--full-epoch", action=argparse.BooleanOptionalAction, default=True,
                    help="also time one full SimCLR epoch with the monitor (about 1-2 minutes at 64 px)")
    args = ap.parse_args()
    overrides = [f"data.root={args.data}", f"data.image_size={args.size}", "train.batch_size=128", "data.workers=2"]
    cfg = load_config(CONFIG, overrides)
    inputs = resolve_inputs(cfg)

    rows = {}
    for method in args.methods:
        rates = {"plain": [], "project": []}
        measure = {"plain": lambda: PLAIN[method](inputs, cfg, args.steps),
                   "project": lambda: project_loop(overrides, method, inputs, args.steps)}
        for i in range(args.repeats):  # interleaved, each side first in turn: noise hits both alike
            for side in ("plain", "project") if i % 2 == 0 else ("project", "plain"):
                rates[side].append(measure[side]())
        best = {k: max(v) for k, v in rates.items()}
        paired = sorted(j / p for j, p in zip(rates["project"], rates["plain"]))  # each pair ran back to back:
        # a drift in the machine's speed over minutes (steal time on a shared VM) cancels within a pair
        rows[method] = {"plain_images_per_s": best["plain"], "project_images_per_s": best["project"],
                        "ratio_project_over_plain": best["project"] / best["plain"],
                        "paired_ratios": paired, "median_paired_ratio": statistics.median(paired), "all_rates": rates}
    result = {"image_size": args.size, "batch_size": 128, "steps": args.steps, "repeats": args.repeats,
              "threads": torch.get_num_threads(), "methods": rows}

    print(f"\nPretraining step throughput, ResNet-18, {args.size}px, batch 128 (two views each), "
          f"{args.steps} steps, best of {args.repeats}")
    print(f"{'method':<10}{'plain img/s':>13}{'project img/s':>15}{'ratio':>8}{'paired ratios (median)':>36}")
    for method, r in rows.items():
        pairs = " ".join(f"{x:.3f}" for x in r["paired_ratios"]) + f" ({r['median_paired_ratio']:.3f})"
        print(f"{method:<10}{r['plain_images_per_s']:>13.1f}{r['project_images_per_s']:>15.1f}"
              f"{r['ratio_project_over_plain']:>8.3f}{pairs:>36}", flush=True)
    out = REPO / "tests" / "benchmarks" / "results" / "bench_pretrain.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))  # kept even if the full epoch below is interrupted

    if args.full_epoch:  # the budget config's monitor, run on this epoch
        full = load_config(CONFIG, overrides + ["monitor.every=1"])
        m = next(pretrain(full, inputs)).metrics
        result.update(epoch_seconds=m["epoch_seconds"], monitor_seconds=m["monitor_seconds"],
                      monitor_share=m["monitor_seconds"] / m["epoch_seconds"], monitor_bank=full.monitor.max_bank,
                      knn_balanced_accuracy_epoch1=m["knn_balanced_accuracy"])
        print(f"full SimCLR epoch: {result['epoch_seconds']:.1f} s, of which kNN monitor "
              f"{result['monitor_seconds']:.1f} s ({100 * result['monitor_share']:.1f}%, bank "
              f"{full.monitor.max_bank or 'all'} images)")
        out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
