"""What `train.precision` buys on this CPU: a fine-tune step of the ResNet-18 classifier (forward,
backward, fused Adam; batch 32, channels_last) in fp32 and under bf16 autocast, by input size.

    python tests/benchmarks/bench_precision.py [--sizes 64 96 128] [--threads 2] [--repeats 3]

Random inputs (the step's arithmetic does not depend on the pixels); both precisions in the same
process, alternating, best of `--repeats` rounds of 5 steps each after 3 warm-up steps. Prints a
table and whether the CPU has bf16 units, writes results/bench_precision.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from skinclr.runtime import cpu_bf16_units, describe_device
from skinclr.train.engine import adam, autocast, to_device
from skinclr.train.models import build_classifier

RESULTS = Path(__file__).parent / "results" / "bench_precision.json"


def step_ms(size: int, precision: str, repeats: int, batch: int = 32) -> float:
    torch.manual_seed(0)
    device = torch.device("cpu")
    model = build_classifier("resnet18", 7).to(memory_format=torch.channels_last)
    opt = adam(model.parameters(), 1e-4)
    x, y = to_device(torch.randn(batch, 3, size, size), device), torch.randint(0, 7, (batch,))

    def step():
        with autocast(device, precision):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    for _ in range(3):
        step()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(5):
            step()
        best = min(best, (time.perf_counter() - t0) / 5)
    return best * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for size in args.sizes:
        fp32, bf16 = step_ms(size, "fp32", args.repeats), step_ms(size, "bf16", args.repeats)
        rows.append({"size": size, "fp32_ms": round(fp32, 1), "bf16_ms": round(bf16, 1),
                     "speedup": round(fp32 / bf16, 2)})
    units = cpu_bf16_units()
    print(f"\n{describe_device(torch.device('cpu'))}; bf16 units (AMX/AVX-512 BF16): {units}")
    print(f"fine-tune step, ResNet-18, batch 32, {args.threads} threads")
    print(f"{'size':>6} {'fp32 ms':>9} {'bf16 ms':>9} {'fp32/bf16':>10}")
    for r in rows:
        print(f"{r['size']:>6} {r['fp32_ms']:>9} {r['bf16_ms']:>9} {r['speedup']:>10}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"cpu": describe_device(torch.device("cpu")), "bf16_units": units,
                                   "threads": args.threads, "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
