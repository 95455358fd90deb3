"""SimCLR step throughput: the project's loop against a plain PyTorch loop, in one run.

Both use the same model, batch, cached real images and augmentation; the ratio
project/plain is the figure (goal >= 0.95). Also reports the kNN monitor's share of a full
epoch on the real data.

    .venv/bin/python tests/benchmarks/bench_pretrain.py [--data DIR] [--size 64] [--steps 12]
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from core.augment import simclr_transform  # noqa: E402
from core.config import load_config  # noqa: E402
from core.inputs import make_loader, resolve_inputs  # noqa: E402
from core.models import build_simclr  # noqa: E402
from core.pretrain import pretrain  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "isic2018-task3-200x150"


def plain_loop(inputs, cfg, steps: int) -> float:
    """What a researcher would write by hand: no records, no monitor, no checkpoint."""
    torch.manual_seed(0)
    model = build_simclr("resnet18").to(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    views = simclr_transform(cfg.data.image_size, cfg.augment.crop_min)
    loader = make_loader(inputs.cache, inputs.train_rows, views, batch_size=cfg.train.batch_size, seed=0,
                         shuffle=True, drop_last=True, workers=cfg.data.workers)
    t = cfg.simclr.temperature
    seen, t0 = 0, time.perf_counter()
    for i, ((a, b), _) in enumerate(loader):
        if i == steps:
            break
        z = torch.nn.functional.normalize(model(torch.cat([a, b]).contiguous(memory_format=torch.channels_last)), dim=1)
        n = len(a)
        sim = z @ z.T / t
        sim.fill_diagonal_(float("-inf"))
        target = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
        loss = torch.nn.functional.cross_entropy(sim, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        seen += n
    return seen / (time.perf_counter() - t0)


def project_loop(cfg, inputs, steps: int) -> float:
    cfg.train.max_steps_per_epoch = steps
    cfg.monitor.every = 10**6  # the monitor is measured separately below
    cfg.train.epochs = 10**6
    record = next(pretrain(cfg, inputs))
    return record.metrics["images_per_second"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--full-epoch", action=argparse.BooleanOptionalAction, default=True,
                    help="also time one full epoch with the monitor (about 1-2 minutes at 64 px)")
    args = ap.parse_args()
    overrides = [f"data.root={args.data}", f"data.image_size={args.size}", "train.batch_size=128", "data.workers=2"]
    cfg = load_config(REPO / "experiments" / "cpu" / "simclr_pretrain.yaml", overrides)
    inputs = resolve_inputs(cfg)

    rates = {"plain": [], "project": []}
    for _ in range(args.repeats):  # interleaved, so machine noise hits both alike
        rates["plain"].append(plain_loop(inputs, cfg, args.steps))
        rates["project"].append(project_loop(load_config(REPO / "experiments/cpu/simclr_pretrain.yaml", overrides),
                                             inputs, args.steps))
    best = {k: max(v) for k, v in rates.items()}
    result = {"image_size": args.size, "batch_size": 128, "steps": args.steps, "threads": torch.get_num_threads(),
              "plain_images_per_s": best["plain"], "project_images_per_s": best["project"],
              "ratio_project_over_plain": best["project"] / best["plain"], "all_rates": rates}

    print(f"\nSimCLR step throughput, ResNet-18, {args.size}px, batch 128, {args.steps} steps, best of {args.repeats}")
    print(f"{'loop':<10}{'images/s':>10}")
    print(f"{'plain':<10}{best['plain']:>10.1f}")
    print(f"{'project':<10}{best['project']:>10.1f}")
    print(f"ratio project/plain: {result['ratio_project_over_plain']:.3f}", flush=True)
    out = REPO / "tests" / "benchmarks" / "results" / "bench_pretrain.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))  # kept even if the full epoch below is interrupted

    if args.full_epoch:  # the budget config's monitor, run on this epoch
        full = load_config(REPO / "experiments" / "cpu" / "simclr_pretrain.yaml", overrides + ["monitor.every=1"])
        m = next(pretrain(full, inputs)).metrics
        result.update(epoch_seconds=m["epoch_seconds"], monitor_seconds=m["monitor_seconds"],
                      monitor_share=m["monitor_seconds"] / m["epoch_seconds"], monitor_bank=full.monitor.max_bank,
                      knn_balanced_accuracy_epoch1=m["knn_balanced_accuracy"])
        print(f"full epoch: {result['epoch_seconds']:.1f} s, of which kNN monitor {result['monitor_seconds']:.1f} s "
              f"({100 * result['monitor_share']:.1f}%, bank {full.monitor.max_bank or 'all'} images)")
        out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
