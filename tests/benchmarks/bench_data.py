"""Throughput of SimCLR two-view batches: JPEG decode per sample vs the decoded-image cache.

    python tests/benchmarks/bench_data.py [--root DIR] [--sizes 64 128] [--batches 10]

Both pipelines run the same augmentation in a DataLoader with 2 workers over the real data,
shuffled. The first batch of each worker is warm-up (worker start, page cache); the timed
batches then arrive in steady state. Prints a table, writes results/bench_data.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from skinclr.train.augment import simclr_transform  # noqa: E402
from skinclr.data.images import fit_square  # noqa: E402
from skinclr.data.cache import CachedDataset, build_cache  # noqa: E402
from skinclr.data.manifest import read_manifest  # noqa: E402
from skinclr.data.images import load_rgb  # noqa: E402

DEFAULT_ROOT = Path(os.environ.get("SKINCLR_REAL_DATA", REPO.parent / "shared" / "data" / "isic2018-task3-200x150"))
RESULTS = Path(__file__).parent / "results" / "bench_data.json"


class DecodeEachTime(torch.utils.data.Dataset):
    """The pipeline without a cache: decode, square, augment on every access."""

    def __init__(self, paths: list[str], labels, size: int, transform):
        self.paths, self.labels, self.size, self.transform = paths, labels, size, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return self.transform(fit_square(load_rgb(self.paths[i]), self.size)), int(self.labels[i])


def images_per_second(dataset, batch_size: int, batches: int, workers: int) -> float:
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         generator=torch.Generator().manual_seed(0), drop_last=True)
    batches_seen = iter(loader)
    for _ in range(max(workers, 1)):
        next(batches_seen)
    start = time.perf_counter()
    for _ in range(batches):
        (a, b), _ = next(batches_seen)
    elapsed = time.perf_counter() - start
    del batches_seen
    return batches * batch_size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    manifest = read_manifest(args.root)
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-cache-") as cache_dir:
        for size in args.sizes:
            views = simclr_transform(size, crop_min=0.08, color_strength=0.5, blur_prob=0.5, gray_prob=0.2)
            start = time.perf_counter()
            cache = build_cache(manifest, size, cache_dir=cache_dir, workers=args.workers, progress=False)
            build_s = time.perf_counter() - start
            per_sample = DecodeEachTime(manifest.frame["path"].tolist(), manifest.frame["label"].to_numpy(), size, views)
            decode = images_per_second(per_sample, args.batch_size, args.batches, args.workers)
            cached = images_per_second(CachedDataset(cache, None, views), args.batch_size, args.batches, args.workers)
            rows.append({"size": size, "decode_images_per_s": round(decode, 1), "cache_images_per_s": round(cached, 1),
                         "ratio": round(cached / decode, 2), "cache_build_s": round(build_s, 2)})

    print(f"SimCLR two-view batches of {args.batch_size}, {args.workers} DataLoader workers, "
          f"{args.batches} timed batches, {len(manifest.frame):,} images ({os.cpu_count()} CPUs)")
    print(f"{'size':>5}  {'decode+resize+aug img/s':>23}  {'cache+aug img/s':>15}  {'ratio':>6}  {'cache build s':>13}")
    for r in rows:
        print(f"{r['size']:>5}  {r['decode_images_per_s']:>23,.0f}  {r['cache_images_per_s']:>15,.0f}  "
              f"{r['ratio']:>6.2f}  {r['cache_build_s']:>13.1f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "benchmark": "simclr two-view data loading", "batch_size": args.batch_size, "batches": args.batches,
        "workers": args.workers, "images": len(manifest.frame), "cpus": os.cpu_count(),
        "platform": platform.platform(), "torch": torch.__version__, "results": rows}, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
