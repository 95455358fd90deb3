"""SimCLR step throughput on a GPU: what the model alone could do, and how close the full step
gets with augmentation in CPU workers (albumentations) and on the device (core/train/augment_gpu.py).

Rows per backbone (images/s, two views each): (a) the model alone, forward + backward + fused
Adam step on random tensors already on the GPU; (b) the full step, augmentation in DataLoader
workers; (c) the full step, augmentation on the device; each eager and, with --compile, with
`train.compile`. Prints c/a (goal >= 0.85) and writes JSON. (b) and (c) run the project's
engine for two epochs of `--steps` steps and keep the second, so start-up is not counted but
each epoch's loader start is. Also estimates the paper's recipe (100 epochs at 224 px over
the 8,584 train images) from (c).

    python tests/benchmarks/bench_gpu.py                 # on a CUDA machine, synthetic images
    python tests/benchmarks/bench_gpu.py --data DIR      # the real images
    python tests/benchmarks/bench_gpu.py --device cpu --size 32 --batch 16 --steps 2 --n 300   # a smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from skinclr.config import load_config  # noqa: E402
from skinclr.train.engine import adam, autocast, compiled, run  # noqa: E402
from skinclr.data.inputs import resolve_inputs  # noqa: E402
from skinclr.train.losses import nt_xent  # noqa: E402
from skinclr.train.methods.base import Pretraining  # noqa: E402
from skinclr.train.models import build_simclr  # noqa: E402

CONFIG = REPO / "experiments" / "paper" / "simclr_pretrain.yaml"
PAPER_TRAIN_IMAGES, PAPER_EPOCHS = 8584, 100


class OnDevice(Pretraining):
    """SimCLR with the tensor path whatever the device (on a CPU, `augment.device` cannot choose it)."""

    def setup(self, device, resume):
        optimizer = super().setup(device, resume)
        if self.data is None:
            self.use_tensor_path()
        return optimizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def model_alone(backbone: str, size: int, batch: int, steps: int, device: torch.device, compile_: bool) -> float:
    torch.manual_seed(0)
    model = build_simclr(backbone).to(device, memory_format=torch.channels_last)
    net = compiled(model, compile_)
    opt = adam(model.parameters(), 1e-3)
    x = torch.randn(2 * batch, 3, size, size, device=device).contiguous(memory_format=torch.channels_last)

    def step():
        with autocast(device):
            z1, z2 = net(x).float().chunk(2)
            loss = nt_xent(z1, z2, 0.5)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(max(3, steps // 5)):  # warm-up: cuDNN's autotuner, compilation
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    return steps * batch / (time.perf_counter() - t0)


def full_step(cfg, inputs, on_device: bool) -> float:
    task = OnDevice(cfg, inputs) if on_device else Pretraining(cfg, inputs)
    records = list(run(task, cfg.train))
    return records[-1].metrics["images_per_second"]


def save(result: dict, out: Path, device: torch.device) -> None:
    if device.type == "cuda":
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, help="dataset folder (default: synthetic images made here)")
    ap.add_argument("--n", type=int, default=4096, help="synthetic images when --data is not given")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--backbones", nargs="+", default=["resnet18", "resnet50"])
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    ap.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True,
                    help="also measure with torch.compile (train.compile)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "benchmarks" / "results" / "bench_gpu.json")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_gpu: no CUDA device visible; run it on a GPU machine (or pass --device cpu for a smoke run)")
    if args.data is None:
        from skinclr.data.synth import make_synthetic

        args.data = make_synthetic(Path(tempfile.gettempdir()) / f"skinclr-bench-synth-{args.n}", n=args.n, seed=0)

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {"device": gpu, "torch": torch.__version__, "size": args.size, "batch": args.batch, "steps": args.steps,
              "workers": args.workers, "data": str(args.data), "rows": []}
    variants = [False, True] if args.compile else [False]
    for backbone in args.backbones:
        sets = [f"data.root={args.data}", f"data.image_size={args.size}", f"train.batch_size={args.batch}",
                f"train.device={args.device}", f"model.backbone={backbone}", "train.epochs=2",
                f"train.max_steps_per_epoch={args.steps}", "monitor.every=1000000", f"data.workers={args.workers}"]
        inputs = resolve_inputs(load_config(CONFIG, sets))
        for compile_ in variants:
            a = model_alone(backbone, args.size, args.batch, args.steps, device, compile_)
            extra = [f"train.compile={str(compile_).lower()}"]
            b = full_step(load_config(CONFIG, sets + extra + ["augment.device=cpu"]), inputs, on_device=False)
            c = full_step(load_config(CONFIG, sets + extra), inputs, on_device=True)
            row = {"backbone": backbone, "compile": compile_, "model_alone": a, "cpu_augment": b, "device_augment": c,
                   "c_over_a": c / a, "b_over_a": b / a,
                   "paper_recipe_hours": PAPER_EPOCHS * PAPER_TRAIN_IMAGES / c / 3600}
            result["rows"].append(row)
            save(result, args.out, device)  # each row as it comes: a run cut short keeps what it measured
            print(f"{backbone} compile={compile_}: a {a:.0f}  b {b:.0f}  c {c:.0f} images/s  c/a {c / a:.3f}", flush=True)
    print(f"\nSimCLR step, {gpu}, {args.size}px, batch {args.batch} (two views each), images/s")
    print(f"{'backbone':<10}{'compile':>8}{'(a) model':>11}{'(b) cpu aug':>13}{'(c) device aug':>16}{'c/a':>7}"
          f"{'paper recipe':>14}")
    for r in result["rows"]:
        print(f"{r['backbone']:<10}{str(r['compile']):>8}{r['model_alone']:>11.0f}{r['cpu_augment']:>13.0f}"
              f"{r['device_augment']:>16.0f}{r['c_over_a']:>7.3f}{r['paper_recipe_hours']:>12.2f} h")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
