"""What the sweep layer costs: an 8-trial Ray Tune sweep, 2 trials at a time, against the same
8 trial configs run without Ray by 2 plain Python processes (4 configs each, one after another)
through `run_pretrain`. Same data, cache, split, threads and MLflow logging on both sides; ASHA
is given no rung before the last epoch, so both sides train exactly the same epochs.

    .venv/bin/python tests/benchmarks/bench_sweep.py [--images 600] [--epochs 3]

Ray starts a process per trial (imports, Ray worker) and copies each epoch's checkpoint into its
results folder; the plain processes pay their imports once. That cost is per trial, so the ratio
falls as trials grow (--images). Prints a table and writes tests/benchmarks/results/bench_sweep.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[2]


def sweep_config(path: Path, data: Path, storage: Path, args) -> Path:
    cfg = {
        "stage": "pretrain",
        "data": {"root": str(data), "image_size": args.size, "workers": 0},
        "train": {"epochs": args.epochs, "batch_size": 32, "seed": 0},
        "monitor": {"every": 1, "max_bank": 256},
        "tracking": {"experiment": "bench-sweep"},
        "sweep": {"stage": "pretrain", "num_samples": 8, "max_concurrent": 2, "search": "random",
                  # ASHA's first rung lies past the last epoch: no trial is stopped, both sides
                  # train the same epochs.
                  "grace_period": args.epochs + 1, "max_t": args.epochs + 1, "reduction_factor": 2,
                  "cpus_per_trial": 1,
                  "storage": str(storage), "name": "bench"},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def worker(jobs_file: str) -> None:
    """One plain process: its share of the trial configs, one after another, no Ray."""
    from core.runner import run_pretrain
    from experiments.trainables import TrialSetup, trial_config

    jobs = json.loads(Path(jobs_file).read_text())
    setup = TrialSetup(**jobs["setup"])
    for params in jobs["params"]:
        cfg = trial_config(setup, params)
        cfg.tracking.experiment = "bench-plain"
        run_pretrain(cfg, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=600, help="synthetic images (about 70%% train)")
    parser.add_argument("--size", type=int, default=32, help="image side, pixels")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)

    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["SKINCLR_CACHE"] = str(work / "cache")
    from core.config import load_config
    from core.inputs import resolve_inputs
    from core.synth import make_synthetic
    from experiments.sweep import STATE_FILE
    from experiments.sweep import main as sweep_main

    data = make_synthetic(work / "isic", n=args.images, seed=0)
    config = sweep_config(work / "sweep.yaml", data, work / "ray", args)
    resolve_inputs(load_config(config), progress=False)  # the decode, outside both timings
    load_before = os.getloadavg()

    start = time.perf_counter()
    code = sweep_main(config, [])
    sweep_seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"the sweep failed (exit {code}); see {work / 'ray' / 'bench'}")

    folder = work / "ray" / "bench"
    state = json.loads((folder / STATE_FILE).read_text())
    params = [json.loads((d / "params.json").read_text()) for d in sorted(folder.iterdir()) if (d / "params.json").is_file()]
    files = []
    for k in range(2):
        files.append(work / f"jobs{k}.json")
        files[-1].write_text(json.dumps({"setup": state["setup"], "params": params[k::2]}))
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(f)], cwd=REPO) for f in files]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("a plain worker failed")
    plain_seconds = time.perf_counter() - start

    result = {
        "trials": len(params), "concurrent": 2, "epochs": args.epochs, "images": args.images,
        "batch_size": 32, "image_size": args.size, "backbone": "resnet18",
        "sweep_seconds": round(sweep_seconds, 2), "plain_seconds": round(plain_seconds, 2),
        "ratio": round(sweep_seconds / plain_seconds, 3),
        "overhead_percent": round(100 * (sweep_seconds / plain_seconds - 1), 1),
        "cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
        "python": platform.python_version(),
    }
    shutil.rmtree(work)  # about 150 MB of checkpoints per trial
    rows = [("Ray Tune sweep (8 trials, 2 at a time)", result["sweep_seconds"]),
            ("2 plain processes x 4 trials (run_pretrain)", result["plain_seconds"])]
    print(f"\n{'':46}{'wall s':>10}")
    for name, seconds in rows:
        print(f"{name:46}{seconds:>10.1f}")
    print(f"{'ratio (sweep / plain)':46}{result['ratio']:>10.3f}   overhead {result['overhead_percent']:+.1f}%")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_sweep.json").write_text(json.dumps(result, indent=1))
    print(f"written {RESULTS / 'bench_sweep.json'}")


if __name__ == "__main__":
    main()
