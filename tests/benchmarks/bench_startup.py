"""What a user waits for around the training: each command's start-up, the sweep's fixed cost and
the quickstart, stage by stage, on synthetic data, each with where its time goes.

    python tests/benchmarks/bench_startup.py [--repeats 3] [--skip quickstart,sweep]

* `skinclr --help` and a config error (a misspelt key): the CLI before any library loads.
* `skinclr finetune` to its first optimizer step (the data already cached, a new run each time).
* `skinclr evaluate` of a small fine-tuned model on 20 images (the whole command).
* a sweep of 4 one-epoch trials, 2 at a time, against the same 4 trial configs run by 2 plain
  processes (2 each, no Ray): the difference is the sweep's fixed cost.
* `skinclr quickstart` in a fresh folder, stage by stage (its `[n/5]` lines).

Every timed command is a fresh process, timed from its launch, best of `--repeats`. Where the time
goes: the import time of each top-level package (`python -X importtime`) and the project's own
functions by cumulative time (cProfile, imports excluded), both up to the first step of the
fine-tune and over the whole evaluate. Prints tables, writes results/bench_startup.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import pstats
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parents[2]
SKINCLR = [sys.executable, "-m", "skinclr.cli"]
FINETUNE = str(REPO / "experiments" / "quickstart_finetune.yaml")


# -- a child process: the fine-tune up to its first step ------------------------------------------
def first_step_child(argv: list[str], profile: str | None) -> None:
    """Runs `skinclr finetune ARGV` and exits right after its first optimizer step, printing the
    wall-clock time of that step; with `profile`, cProfile's statistics up to there go to that file."""
    import cProfile

    prof = cProfile.Profile() if profile else None
    if prof:
        prof.enable()
    import torch

    adam_step = torch.optim.Adam.step  # every fine-tune optimizes with Adam (skinclr.train.engine.adam)

    def first(self, *a, **k):
        adam_step(self, *a, **k)
        if prof:
            prof.disable()
            prof.dump_stats(profile)
        print(f"FIRST_STEP_AT {time.time():.4f}", flush=True)
        os._exit(0)
    torch.optim.Adam.step = first
    from skinclr.cli.main import main
    sys.exit(main(["finetune", *argv]))


# -- helpers -------------------------------------------------------------------------------------
def timed(cmd: list[str], env: dict, cwd: Path, expect: int | None = 0) -> tuple[float, str]:
    start = time.time()
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    seconds = time.time() - start
    if expect is not None and proc.returncode != expect:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}, expected {expect}:\n{proc.stderr[-3000:]}")
    return seconds, proc.stdout + proc.stderr


def import_table(cmd: list[str], env: dict, cwd: Path, top: int = 8) -> list[tuple[str, float]]:
    """Seconds each top-level package took to import (its first import, nested ones included)."""
    proc = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], env=env, cwd=cwd, capture_output=True, text=True)
    totals: dict[str, float] = {}
    for line in proc.stderr.splitlines():
        m = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)", line)
        if m and len(m.group(2)) <= 2:  # imported by the program itself or one level down
            pkg = m.group(3).split(".")[0]
            totals[pkg] = max(totals.get(pkg, 0.0), int(m.group(1)) / 1e6)
    return sorted(((p, s) for p, s in totals.items() if s >= 0.05), key=lambda kv: -kv[1])[:top]


def own_functions(stats_file: str, top: int = 8) -> list[tuple[str, float]]:
    """The project's functions with the largest cumulative time (module bodies left out; a
    function's time includes what it imports)."""
    own = (str(REPO / "core"), str(REPO / "experiments"))
    rows = [(f"{Path(path).relative_to(REPO)}:{name}", cum)
            for (path, _, name), (_, _, _, cum, _) in pstats.Stats(stats_file).stats.items()
            if path.startswith(own) and name != "<module>"]
    return sorted(rows, key=lambda r: -r[1])[:top]


def quickstart_stages(env: dict, cwd: Path) -> dict:
    """The quickstart's wall time, split at its `[n/5]` lines."""
    start = time.time()
    proc = subprocess.Popen([*SKINCLR, "quickstart", "--workdir", str(cwd / "qs")], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    marks, tail = [("start (imports, store)", start)], []
    for line in proc.stdout:
        m = re.match(r"\[(\d)/5\] (.*)", line.strip())
        if m:
            marks.append((re.split(r":| \(| in /", m.group(2))[0], time.time()))  # "synthetic data", ...
        tail = (tail + [line])[-20:]
    if proc.wait() != 0:
        raise SystemExit("the quickstart failed:\n" + "".join(tail))
    marks.append(("end", time.time()))
    stages = {a[0]: round(b[1] - a[1], 1) for a, b in zip(marks, marks[1:])}
    return {"seconds": round(marks[-1][1] - start, 1), "stages": stages}


def sweep_fixed_cost(work: Path, epochs: int = 1, images: int = 1200) -> dict:
    """4 one-epoch trials as a sweep and as 2 plain processes; bench_sweep's arms, at 4 trials."""
    sys.path.insert(0, str(Path(__file__).parent))
    import bench_sweep
    from skinclr.config import load_config
    from skinclr.data.inputs import resolve_inputs
    from skinclr.data.synth import make_synthetic

    data = make_synthetic(work / "sweepdata", n=images, seed=0)
    resolve_inputs(load_config(bench_sweep.sweep_config(work / "probe.yaml", data, work / "ray", "probe", epochs, 4)),
                   progress=False)
    sweep_s, jobs = bench_sweep.sweep_arm(work, data, epochs, "startup", trials=4)
    plain_s = bench_sweep.plain_arm(jobs)
    return {"trials": 4, "concurrent": 2, "epochs": epochs, "images": images, "sweep_seconds": round(sweep_s, 1),
            "plain_seconds": round(plain_s, 1), "fixed_cost_seconds": round(sweep_s - plain_s, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip", default="", help="comma-separated: quickstart, sweep")
    parser.add_argument("--first-step", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.first_step is not None:
        profile = os.environ.get("BENCH_PROFILE")
        return first_step_child(args.first_step, profile)
    skip = set(filter(None, args.skip.split(",")))

    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}", "SKINCLR_CACHE": str(work / "cache"),
           "NO_ALBUMENTATIONS_UPDATE": "1", "SKINCLR_CHECKPOINTS": str(work / "checkpoints")}
    os.environ.update(env)
    from skinclr.data.synth import make_synthetic

    train = make_synthetic(work / "data", n=300, seed=0)
    test = make_synthetic(work / "test", n=20, seed=1)
    load_before = os.getloadavg()
    best = lambda xs: round(min(xs), 2)  # noqa: E731
    rows, result = [], {}

    t = [timed([*SKINCLR, "--help"], env, work)[0] for _ in range(args.repeats)]
    result["help"] = best(t)
    rows.append(("skinclr --help", result["help"], "-"))
    t = [timed([*SKINCLR, "finetune", "--config", FINETUNE, "--set", "train.epoch=1"], env, work, expect=1)[0]
         for _ in range(args.repeats)]
    result["config_error"] = best(t)
    rows.append(("a config error (train.epoch)", result["config_error"], "-"))

    ft = ["--config", FINETUNE, "--set", f"data.root={train}", "--set", "tracking.resume=false"]
    child = [sys.executable, __file__, "--first-step", *ft]
    timed([*SKINCLR, "finetune", *ft, "--set", "train.epochs=1"], env, work)  # caches the data; a model to evaluate
    t = []
    for _ in range(args.repeats):
        start = time.time()
        out = timed(child, env, work)[1]
        t.append(float(re.search(r"FIRST_STEP_AT (\S+)", out).group(1)) - start)
    result["finetune_first_step"] = best(t)
    rows.append(("skinclr finetune -> its first step", result["finetune_first_step"], "5"))
    timed(child, {**env, "BENCH_PROFILE": str(work / "finetune.prof")}, work)
    result["finetune_imports"] = import_table(child, env, work)
    result["finetune_functions"] = own_functions(str(work / "finetune.prof"))

    from mlflow.tracking import MlflowClient
    client = MlflowClient(env["MLFLOW_TRACKING_URI"])  # the one finished run: the one-epoch fine-tune
    run = client.search_runs([e.experiment_id for e in client.search_experiments()],
                             "attributes.status = 'FINISHED'", max_results=1)[0]
    ev = [*SKINCLR, "evaluate", "--model", f"runs:/{run.info.run_id}/model", "--data", str(test)]
    t = [timed(ev, env, work)[0] for _ in range(args.repeats)]
    result["evaluate_20"] = best(t)
    rows.append(("skinclr evaluate, 20 images", result["evaluate_20"], "5"))
    result["evaluate_imports"] = import_table(ev, env, work)
    profiled = ("import cProfile, sys; from skinclr.cli.main import main; "  # main: the command's exit skips the write
                f"cProfile.run('main(sys.argv[1:])', {str(work / 'evaluate.prof')!r})")
    subprocess.run([sys.executable, "-c", profiled, *ev[3:]], env=env, cwd=work, capture_output=True)
    result["evaluate_functions"] = own_functions(str(work / "evaluate.prof"))

    if "sweep" not in skip:
        result["sweep"] = sweep_fixed_cost(work)
        rows.append(("sweep of 4 one-epoch trials", result["sweep"]["sweep_seconds"], "-"))
        rows.append(("  the same 4 trials in 2 plain processes", result["sweep"]["plain_seconds"], "-"))
        rows.append(("  the sweep's fixed cost", result["sweep"]["fixed_cost_seconds"], "10"))
    if "quickstart" not in skip:
        result["quickstart"] = quickstart_stages(env, work)
        rows.append(("skinclr quickstart", result["quickstart"]["seconds"], "60"))
        for stage, seconds in result["quickstart"]["stages"].items():
            rows.append((f"  {stage}", seconds, "-"))
    shutil.rmtree(work, ignore_errors=True)

    import torch
    from skinclr.runtime import describe_device

    cpu = describe_device(torch.device("cpu"))
    result.update({"repeats": args.repeats, "cpus": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
                   "load_average_before": [round(x, 2) for x in load_before],
                   "load_average_after": [round(x, 2) for x in os.getloadavg()]})
    print(f"\n{cpu}, {os.cpu_count()} cores")
    print(f"{'start-up (best of ' + str(args.repeats) + ')':52}{'seconds':>9}{'goal':>7}")
    for name, seconds, goal in rows:
        print(f"{name:52}{seconds:>9.2f}{goal:>7}")
    for what in ("finetune", "evaluate"):
        print(f"\n{what}: imports (s)  " + ", ".join(f"{p} {s:.2f}" for p, s in result[f"{what}_imports"]))
        print(f"{what}: own functions, cumulative (s)")
        for name, seconds in result[f"{what}_functions"]:
            print(f"  {seconds:7.2f}  {name}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bench_startup.json").write_text(json.dumps(result, indent=1))
    print(f"written {RESULTS / 'bench_startup.json'}")


if __name__ == "__main__":
    main()
