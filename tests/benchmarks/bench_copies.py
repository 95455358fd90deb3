"""Where COPY_DISTANCE comes from: copy hashes of the real training images, against each other and
against re-encoded and resized copies of a sample.

    python tests/benchmarks/bench_copies.py [--root DIR] [--size 64] [--sample 300]

Every image is squared as a model sees it (`fit_square` at --size), hashed once, and compared
with every other image (about 50 million pairs): pairs of one lesion (HAM10000 photographs a
lesion more than once) and pairs of different lesions are counted apart, by distance. A sample
is then re-saved at JPEG quality 70 and halved in size, and each copy is compared with its
original. A good threshold catches every copy and no pair of different lesions. Prints a table,
writes results/bench_copies.json.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from skinclr.data.images import COPY_DISTANCE, copy_distances, copy_hash, fit_square, load_rgb  # noqa: E402
from skinclr.data.manifest import read_manifest  # noqa: E402

DEFAULT_ROOT = Path(os.environ.get("SKINCLR_REAL_DATA", REPO.parent / "shared" / "data" / "isic2018-task3-200x150"))
RESULTS = Path(__file__).parent / "results" / "bench_copies.json"
THRESHOLDS = (8, 12, 16, 20, 24, 28, 32)


def copies(rgb: np.ndarray) -> dict[str, np.ndarray]:
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, format="JPEG", quality=70)
    half = Image.fromarray(rgb).resize((rgb.shape[1] // 2, rgb.shape[0] // 2), Image.Resampling.BILINEAR)
    return {"jpeg_q70": np.asarray(Image.open(buffer).convert("RGB")), "half_size": np.asarray(half)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", type=Path, default=DEFAULT_ROOT)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--sample", type=int, default=300)
    args = parser.parse_args()

    frame = read_manifest(args.root).frame
    t0 = time.perf_counter()
    hashes = [copy_hash(fit_square(load_rgb(p), args.size)) for p in frame["path"]]
    hash_s = time.perf_counter() - t0
    lesion = frame["lesion_id"].fillna(frame["image"]).to_numpy()
    same, other, closest = np.zeros(257, int), np.zeros(257, int), []
    for i in range(0, len(hashes), 256):
        d = copy_distances(hashes[i:i + 256], hashes)
        for r, row in enumerate(d):
            k = i + r
            later, one = row[k + 1:], lesion[k + 1:] == lesion[k]
            same += np.bincount(later[one], minlength=257)
            other += np.bincount(later[~one], minlength=257)
            closest += [(int(v), frame["image"][k], frame["image"][k + 1 + j])
                        for j, v in enumerate(later) if not one[j] and v <= COPY_DISTANCE]
    picked = np.random.default_rng(0).choice(len(hashes), min(args.sample, len(hashes)), replace=False)
    moved: dict[str, list[int]] = {"jpeg_q70": [], "half_size": []}
    for k in picked:
        for kind, img in copies(load_rgb(frame["path"][k])).items():
            moved[kind].append(int(copy_distances([copy_hash(fit_square(img, args.size))], [hashes[k]])[0, 0]))

    print(f"{len(hashes):,} images hashed at {args.size} px in {hash_s:.1f} s; COPY_DISTANCE = {COPY_DISTANCE}")
    print(f"{'within bits':>12} {'same lesion':>12} {'other lesions':>14}")
    for t in THRESHOLDS:
        print(f"{t:>12} {same[:t + 1].sum():>12,} {other[:t + 1].sum():>14,}")
    for kind, d in moved.items():
        print(f"{kind:>12}: copies moved median {np.median(d):.0f}, 99% {np.percentile(d, 99):.0f}, max {max(d)} bits; "
              f"{np.mean(np.array(d) <= COPY_DISTANCE):.1%} within COPY_DISTANCE")
    for d, a, b in sorted(closest):
        print(f"  other lesions within COPY_DISTANCE: {a} ~ {b} ({d} bits)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({
        "images": len(hashes), "size": args.size, "copy_distance": COPY_DISTANCE, "hash_seconds": hash_s,
        "pairs_within": {str(t): {"same_lesion": int(same[:t + 1].sum()), "other_lesions": int(other[:t + 1].sum())}
                         for t in THRESHOLDS},
        "copies": {kind: {"median": float(np.median(d)), "p99": float(np.percentile(d, 99)), "max": max(d),
                          "caught": float(np.mean(np.array(d) <= COPY_DISTANCE))} for kind, d in moved.items()},
        "other_lesions_within": [{"bits": d, "images": [a, b]} for d, a, b in sorted(closest)]}, indent=2) + "\n")
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
