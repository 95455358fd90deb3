"""What the sweep layer costs: an 8-trial Ray Tune sweep, 2 trials at a time, against the same
8 trial configs run without Ray by 2 plain Python processes (4 configs each, one after another)
through `run_pretrain`. Same data, cache, split, threads and MLflow logging on both sides; ASHA
is given no rung within the epochs, so both sides train exactly the same epochs.

    .venv/bin/python tests/benchmarks/bench_sweep.py [--images 4800] [--epochs 3] [--rounds 1]

Ray starts a process per trial (a Ray worker that imports torch, MLflow and the project) and
copies each epoch's checkpoint into its results folder; the plain processes pay their imports
once. That cost is per trial, not per epoch, so the ratio falls as trials grow (--images): on
2 cores it was about 35 s per sweep both at 2,400 images (trials of about 55 s: +15.6%) and at
4,800 (trials of about 105 s: +8.6%). The default is the larger size, still far shorter than
a real trial (the CPU budget pretrain runs 26 minutes). The arms alternate
sweep, plain, plain, sweep, ... so a machine whose load drifts during the run biases neither.
Prints a table and writes tests/benchmarks/results/bench_sweep.json.
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


def sweep_config(path: Path, data: Path, storage: Path, name: str, epochs: int, trials: int = 8) -> Path:
    cfg = {
        "stage": "pretrain",
        "data": {"root": str(data), "image_size": 32, "workers": 0},
        "train": {"epochs": epochs, "batch_size": 32, "seed": 0},
        "monitor": {"every": 1, "max_bank": 256},
        "tracking": {"experiment": "bench-sweep"},
        # ASHA's first rung lies past the last epoch: no trial is stopped.
        "sweep": {"stage": "pretrain", "num_samples": trials, "max_concurrent": 2, "search": "random",
                  "grace_period": epochs + 1, "max_t": epochs + 1, "reduction_factor": 2, "cpus_per_trial": 1,
                  "storage": str(storage), "name": name},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def sweep_arm(work: Path, data: Path, epochs: int, name: str, trials: int = 8) -> tuple[float, list[Path]]:
    """Wall time of one sweep, and job files splitting its trial configs over 2 processes."""
    from skinclr.names import SWEEP_STATE_FILE
    from skinclr.tune.sweep import main as sweep_main

    config = sweep_config(work / f"{name}.yaml", data, work / "ray", name, epochs, trials)
    start = time.perf_counter()
    code = sweep_main(config, [])
    seconds = time.perf_counter() - start
    folder = work / "ray" / name
    if code != 0:
        raise SystemExit(f"the sweep failed (exit {code}); see {folder}")
    setup = json.loads((folder / SWEEP_STATE_FILE).read_text())["setup"]
    params = [json.loads((d / "params.json").read_text()) for d in sorted(folder.iterdir()) if (d / "params.json").is_file()]
    jobs = []
    for k in range(2):
        jobs.append(work / f"{name}-jobs{k}.json")
        jobs[-1].write_text(json.dumps({"setup": setup, "params": params[k::2]}))
    return seconds, jobs


def plain_arm(jobs: list[Path]) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # what Ray sets for a 1-CPU trial
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(f)], cwd=REPO, env=env) for f in jobs]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("a plain worker failed")
    return time.perf_counter() - start


def worker(jobs_file: str) -> None:
    """One plain process: its share of the trial configs, one after another, no Ray."""
    from skinclr.run.runner import run_pretrain
    from skinclr.tune.trainables import TrialSetup, trial_config

    jobs = json.loads(Path(jobs_file).read_text())
    setup = TrialSetup(**jobs["setup"])
    for params in jobs["params"]:
        cfg = trial_config(setup, params)
        cfg.tracking.experiment = "bench-plain"
        run_pretrain(cfg, progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=4800, help="synthetic images (85%% of them train)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="sweep/plain pairs, in alternating order")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)

    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    os.environ["SKINCLR_CACHE"] = str(work / "cache")
    from skinclr.config import load_config
    from skinclr.data.inputs import resolve_inputs
    from skinclr.data.synth import make_synthetic

    data = make_synthetic(work / "isic", n=args.images, seed=0)
    resolve_inputs(load_config(sweep_config(work / "probe.yaml", data, work / "ray", "probe", args.epochs)),
                   progress=False)  # the decode, outside every timing
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {"sweep": [], "plain": []}
    jobs: list[Path] = []
    for r in range(args.rounds):
        for arm in ("sweep", "plain") if r % 2 == 0 else ("plain", "sweep"):
            if arm == "sweep":
                seconds, jobs = sweep_arm(work, data, args.epochs, f"round{r}")
            else:
                seconds = plain_arm(jobs)
            times[arm].append(seconds)
            print(f"[bench] round {r + 1} {arm}: {seconds:.1f} s (load {os.getloadavg()[0]:.1f})", flush=True)
    shutil.rmtree(work)  # checkpoints: a few hundred MB per trial

    sweep_s, plain_s = sum(times["sweep"]), sum(times["plain"])
    result = {
        "trials": 8, "concurrent": 2, "epochs": args.epochs, "images": args.images, "image_size": 32,
        "batch_size": 32, "backbone": "resnet18", "rounds": args.rounds,
        "sweep_seconds": [round(t, 2) for t in times["sweep"]], "plain_seconds": [round(t, 2) for t in times["plain"]],
        "ratio": round(sweep_s / plain_s, 3), "overhead_percent": round(100 * (sweep_s / plain_s - 1), 1),
        "cpus": os.cpu_count(), "load_average_before": [round(x, 2) for x in load_before],
        "python": platform.python_version(),
    }
    print(f"\n{'':46}{'wall s per round':>28}")
    print(f"{'Ray Tune sweep (8 trials, 2 at a time)':46}{'  '.join(f'{t:8.1f}' for t in times['sweep']):>28}")
    print(f"{'2 plain processes x 4 trials (run_pretrain)':46}{'  '.join(f'{t:8.1f}' for t in times['plain']):>28}")
    print(f"{'ratio (sweep / plain, all rounds)':46}{result['ratio']:>28.3f}   overhead "
          f"{result['overhead_percent']:+.1f}%")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_sweep.json").write_text(json.dumps(result, indent=1))
    print(f"written {RESULTS / 'bench_sweep.json'}")


if __name__ == "__main__":
    main()
