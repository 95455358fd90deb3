"""The real-data recipe search, end to end, as the platform's own commands.

Every number in the README's results comes out of one of these steps, each a `skinclr` command
logged to MLflow. A step that was interrupted resumes (a sweep with --resume, a single run by
itself: it finds its unfinished run) and a finished step is skipped, so after any interruption
the same command continues:

    python experiments/studies/recipe_search.py --data DIR [--out outputs/recipes] [--dry-run]

With `--recipes experiments/cpu` steps 1-4 are skipped and the shipped recipes (the winners of a
finished search) are run instead: steps 5-9 alone, the part that measures them.

1. ft_scratch      fine-tune sweep from scratch (experiments/sweeps/recipe_finetune.yaml)
2. pretrain_sweep  SimCLR sweep over temperature, crop and colour (experiments/sweeps/recipe_pretrain.yaml)
3. ft_simclr       the fine-tune sweep again, from the best pretrain trial's backbone
4. recipes         OUT/recipe_{scratch,pretrain,simclr}.yaml: each sweep's best trial as a standalone config
5. recipe_pretrain the pretraining recipe at the CPU budget (run name recipe_pretrain)
6. seeds           both fine-tune recipes, seeds 0-2, one step per run, SimCLR and scratch in turn
                   (experiment skinclr-recipes): stopped at any point, the two stay comparable
7. paper_pretrain  the paper's SimCLR pretraining at the CPU budget (run name paper_pretrain), then
   paper           its fine-tuning from scratch and from that run, seeds 0-2: a grid study
                   (experiments/studies/paper.yaml, experiment skinclr-paper-cpu)
8. study           label efficiency (experiments/studies/label_efficiency.yaml) with the scratch recipe's settings
9. reports         `skinclr report` of steps 6-8 into OUT/reports/
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml
from skinclr import names

REPO = Path(__file__).resolve().parents[2]
SEEDS = (0, 1, 2)
PRETRAIN_EPOCHS = 25  # about 40 minutes on 2 cores at 64 px (95 s an epoch with the monitor): inside 45
# What a trial inherits from its sweep and a standalone run must not: the sweep's pinned split
# and cache, one thread per trial CPU, no implicit resume, the trial's name and the sweep section.
STANDALONE = {"data.split_file": "", "data.cache_dir": "", "data.workers": 2, "data.root": "data/isic2018",
              "train.threads": 0, "tracking.resume": True}


def sh(cmd: list[str], dry: bool, log: Path | None = None) -> None:
    print("$", " ".join(cmd), flush=True)
    if dry:
        return
    out = open(log, "a") if log else None
    try:
        code = subprocess.run(cmd, cwd=REPO, stdout=out, stderr=subprocess.STDOUT if out else None).returncode
    finally:
        if out:
            out.close()
    if code != 0:
        sys.exit(f"step failed (exit {code}): {' '.join(cmd)}" + (f"; see {log}" if log else ""))


def sweep_parent(config: str, overrides: list[str]) -> str | None:
    """The parent run id of the sweep this config and these overrides make (None: not started)."""
    from skinclr.names import SWEEP_STATE_FILE
    from skinclr.tune.plan import load_sweep_config, sweep_folder

    cfg, _ = load_sweep_config(REPO / config, overrides)
    state = sweep_folder(cfg) / SWEEP_STATE_FILE
    return json.loads(state.read_text())["setup"]["parent_run_id"] if state.is_file() else None


def best_trial(parent_run_id: str) -> tuple[str, dict[str, str]]:
    """The sweep's best trial: its MLflow run and the values it sampled."""
    from skinclr.track import tracking

    run = tracking.client().get_run(parent_run_id)
    best = run.data.tags.get(names.BEST_RUN_TAG)
    if not best:
        sys.exit(f"sweep {parent_run_id} has no best trial yet; finish it first")
    trial = tracking.client().get_run(best)
    sampled = {k[len(names.SAMPLED_PREFIX):]: v for k, v in trial.data.tags.items() if k.startswith(names.SAMPLED_PREFIX)}
    return best, sampled


def write_recipe(trial_run: str, parent_run: str, path: Path, note: str, changes: dict) -> None:
    """A trial's resolved config as a standalone recipe file, with the sweep named at the top."""
    from skinclr.config import load_config
    from skinclr.track.tracking import RunLogger

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(RunLogger(trial_run).download(names.CONFIG_ARTIFACT, tmp))
    for key, value in {**STANDALONE, **changes}.items():
        from skinclr.config import set_value
        set_value(cfg, key, value)
    body = {k: v for k, v in cfg.to_dict().items() if k != "sweep"}
    header = (f"# {note}\n# Found by the sweep with MLflow parent run {parent_run} (best trial: run {trial_run}).\n"
              f"#   skinclr {cfg.stage} --config {path.name} --set data.root=DIR --set train.seed=S\n")
    path.write_text(header + yaml.safe_dump(body, sort_keys=False))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="the ISIC 2018 Task 3 training folder")
    ap.add_argument("--out", type=Path, default=REPO / "outputs" / "recipes")
    ap.add_argument("--dry-run", action="store_true", help="print the commands of the steps not yet done")
    ap.add_argument("--recipes", type=Path, help="run the recipe_{scratch,pretrain,simclr}.yaml in this folder "
                    "(e.g. experiments/cpu) instead of searching for them: steps 5-9 alone")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="added to every command, e.g. a smoke run: --set data.image_size=32 --set train.epochs=1")
    args = ap.parse_args()
    check(args)
    out, dry = args.out.resolve(), args.dry_run
    (out / "done").mkdir(parents=True, exist_ok=True)
    (out / "logs").mkdir(exist_ok=True)
    skinclr = [sys.executable, "-m", "skinclr.cli.main"]
    root = f"data.root={Path(args.data).resolve()}"
    extra = [x for o in args.overrides for x in ("--set", o)]
    parents_file = out / "parents.json"  # step -> its sweep's parent run, kept once known: a later
    # version of the code may name the same sweep's folder differently (new config keys)

    def parent(name: str, config: str = "", overrides: tuple = ()) -> str | None:
        known = json.loads(parents_file.read_text()) if parents_file.is_file() else {}
        if name not in known and config and (found := sweep_parent(config, [root, *overrides])):
            known[name] = found
            parents_file.write_text(json.dumps(known, indent=1))
        return known.get(name)

    def done(name: str) -> bool:
        print(f"[{name}]" + (" done" if (out / "done" / name).exists() else ""), flush=True)
        return (out / "done" / name).exists()

    def finish(name: str) -> None:
        if not dry:
            (out / "done" / name).touch()

    def run(name: str, commands: list[list[str]], configured: bool = True) -> None:
        """Run a step's commands; `configured` ones (training runs) take the --set overrides too."""
        if not done(name):
            for cmd in commands:
                sh([*cmd, *(extra if configured else [])], dry, out / "logs" / f"{name}.log")
            finish(name)

    def sweep(name: str, config: str, overrides: tuple = ()) -> None:
        if done(name):
            return
        overrides = (*overrides, *args.overrides)
        resume = ["--resume"] if parent(name, config, overrides) else []
        sets = [x for o in (root, *overrides) for x in ("--set", o)]
        sh([*skinclr, "sweep", "--config", config, *sets, *resume], dry, out / "logs" / f"{name}.log")
        parent(name, config, overrides)
        finish(name)

    recipes = (args.recipes or out).resolve()
    if not args.recipes and not search(args, out, dry, sweep, parent, done, finish):
        return print("(the later steps need the pretrain sweep's best trial)")
    run("recipe_pretrain", [[*skinclr, "pretrain", "--config", str(recipes / "recipe_pretrain.yaml"), "--set", root]])
    for s in SEEDS:
        for r in ("simclr", "scratch"):
            run(f"seed_{r}_{s}", [[*skinclr, "finetune", "--config", str(recipes / f"recipe_{r}.yaml"), "--set", root,
                                   "--set", f"train.seed={s}"]])
    # the paper's recipe throughout: its pretraining (16 epochs at this budget), then its fine-tuning of both inits
    run("paper_pretrain", [[*skinclr, "pretrain", "--config", "experiments/cpu/simclr_pretrain.yaml", "--set", root,
                            "--set", "tracking.experiment=skinclr-paper-cpu", "--set", "tracking.run_name=paper_pretrain"]])
    sweep("paper", "experiments/studies/paper.yaml")
    # the study fine-tunes with the scratch recipe's settings (those its search sampled)
    sampled = scratch_settings(recipes / "recipe_scratch.yaml") if args.recipes else best_trial(parent("ft_scratch"))[1]
    sweep("study", "experiments/studies/label_efficiency.yaml",
          ("sweep.grid.finetune.init=[scratch, 'runs:/recipe_pretrain']", *(f"{k}={v}" for k, v in sampled.items())))
    run("reports", [[*skinclr, "report", "--experiment", e, "--out", str(out / "reports" / e)]
                    for e in ("skinclr-recipes", "skinclr-paper-cpu", "skinclr-study")], configured=False)


def check(args) -> None:
    """What would fail a step hours in, refused in one line before the first: the folders, and the
    overrides every command takes (keys and values, against the shipped scratch recipe)."""
    from skinclr.config import load_config

    if not Path(args.data).is_dir():
        raise UsageError(f"--data {args.data}: no such folder; give the ISIC 2018 Task 3 training folder")
    if args.recipes:
        missing = [f"recipe_{r}.yaml" for r in ("scratch", "pretrain", "simclr")
                   if not (args.recipes / f"recipe_{r}.yaml").is_file()]
        if missing:
            raise UsageError(f"--recipes {args.recipes}: no {', '.join(missing)} there; give a folder with the three "
                             "recipes, such as experiments/cpu")
    load_config(REPO / "experiments" / "cpu" / "recipe_scratch.yaml", args.overrides)


class UsageError(Exception):
    """An argument that cannot work."""


def scratch_settings(recipe: Path) -> dict[str, str]:
    """The values a recipe file gives the keys the fine-tune search samples."""
    from skinclr.config import load_config

    cfg = load_config(recipe).to_dict()
    space = yaml.safe_load((REPO / "search_spaces" / "finetune.yaml").read_text())

    values = {key: cfg[key.partition(".")[0]][key.partition(".")[2]] for key in space}
    return {key: str(v).lower() if isinstance(v, bool) else str(v) for key, v in values.items()}


def search(args, out: Path, dry: bool, sweep, parent, done, finish) -> bool:
    """Steps 1-4: the sweeps, and each one's best trial written out as a recipe in OUT; False
    when a dry run cannot go on (no pretrain sweep yet to name the later steps' backbone)."""
    ft_sweep, pre_sweep = "experiments/sweeps/recipe_finetune.yaml", "experiments/sweeps/recipe_pretrain.yaml"
    sweep("ft_scratch", ft_sweep)
    sweep("pretrain_sweep", pre_sweep)
    if dry and not parent("pretrain_sweep"):
        return False
    simclr = (f"finetune.init=runs:/{best_trial(parent('pretrain_sweep'))[0]}", "sweep.num_samples=12")
    sweep("ft_simclr", ft_sweep, simclr)

    if not done("recipes") and not dry:
        budget = "at the CPU budget (64 px, 2 cores)"
        for name, note, changes in (
                ("ft_scratch", f"Fine-tuning from scratch {budget}: under 30 minutes.", {}),
                ("pretrain_sweep", f"SimCLR pretraining {budget}: under 45 minutes.",
                 {"train.epochs": PRETRAIN_EPOCHS, "monitor.max_bank": 3000}),
                ("ft_simclr", f"Fine-tuning from a recipe_pretrain run {budget}: under 30 minutes.",
                 {"finetune.init": "runs:/recipe_pretrain"})):
            recipe = {"ft_scratch": "scratch", "pretrain_sweep": "pretrain", "ft_simclr": "simclr"}[name]
            write_recipe(best_trial(parent(name))[0], parent(name), out / f"recipe_{recipe}.yaml", note,
                         {**changes, "tracking.experiment": "skinclr-recipes", "tracking.run_name": f"recipe_{recipe}"})
        finish("recipes")
    return True


if __name__ == "__main__":
    from skinclr.config import ConfigError

    try:
        main()
    except (ConfigError, UsageError) as err:
        sys.exit(f"error: {err}")
