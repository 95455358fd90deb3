"""What test-time augmentation costs: predictions per second of one classifier on real images,
with no TTA, `flip` (4 views) and `d4` (8 views), in the same process.

    python tests/benchmarks/bench_tta.py [--root DIR] [--size 64] [--images 512] [--repeats 3]

The images are decoded once (prediction from arrays), so the table isolates the forward passes
TTA multiplies; the best of `--repeats` timings is kept per setting. Prints a table, writes
results/bench_tta.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from skinclr.data.images import load_rgb  # noqa: E402
from skinclr.data.manifest import read_manifest  # noqa: E402
from skinclr.serve.predictor import Predictor, model_meta  # noqa: E402
from skinclr.train.engine import TTA_VIEWS  # noqa: E402
from skinclr.train.models import build_classifier  # noqa: E402

DEFAULT_ROOT = Path(os.environ.get("SKINCLR_REAL_DATA", REPO.parent / "shared" / "data" / "isic2018-task3-200x150"))
RESULTS = Path(__file__).parent / "results" / "bench_tta.json"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    paths = read_manifest(args.root).frame["path"].tolist()[:args.images]
    arrays = [load_rgb(p) for p in paths]
    torch.manual_seed(0)
    state = build_classifier("resnet18").state_dict()
    rows = []
    for tta, n_views in TTA_VIEWS.items():
        predictor = Predictor(state, model_meta("resnet18", args.size, "center_crop", tta))
        predictor.predict_proba(arrays[:64])  # warm up
        best = min(_timed(predictor, arrays) for _ in range(args.repeats))
        rows.append({"tta": tta, "views": n_views, "seconds": best, "images_per_s": len(arrays) / best})
    base = rows[0]["seconds"]
    for row in rows:
        row["x_none"] = row["seconds"] / base
        row["per_view_x_none"] = row["x_none"] / row["views"]
    print(f"{len(arrays)} real images at {args.size} px, resnet18, {torch.get_num_threads()} threads, best of {args.repeats}")
    print(f"{'tta':<6}{'views':>6}{'seconds':>10}{'img/s':>9}{'x none':>9}{'x none per view':>17}")
    for r in rows:
        print(f"{r['tta']:<6}{r['views']:>6}{r['seconds']:>10.2f}{r['images_per_s']:>9.1f}{r['x_none']:>9.2f}"
              f"{r['per_view_x_none']:>17.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"images": len(arrays), "size": args.size, "threads": torch.get_num_threads(),
                                   "rows": rows}, indent=1))


def _timed(predictor: Predictor, arrays) -> float:
    t0 = time.perf_counter()
    predictor.predict_proba(arrays)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
