"""The shipped recipes and the script that measures them: the SimCLR recipe is the scratch recipe
with another init (so the two compare inits alone), and `recipe_search.py --recipes` runs them
seed by seed, SimCLR and scratch in turn, then the paper's recipe from its own pretraining (a grid
study over inits and seeds), with the study fine-tuning on the scratch recipe."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from skinclr.config import load_config

REPO = Path(__file__).resolve().parents[2]
CPU = REPO / "experiments" / "cpu"


def test_the_simclr_recipe_differs_from_the_scratch_recipe_in_its_init_alone():
    scratch, simclr = (load_config(CPU / f"recipe_{r}.yaml").flat() for r in ("scratch", "simclr"))
    differ = {k for k in scratch.keys() | simclr.keys() if scratch.get(k) != simclr.get(k)}
    assert differ == {"finetune.init", "tracking.run_name"}
    assert simclr["finetune.init"] == "runs:/recipe_pretrain"
    pretrain = load_config(CPU / "recipe_pretrain.yaml")
    assert pretrain.stage == "pretrain" and pretrain.tracking.run_name == "recipe_pretrain"


def test_the_shipped_recipes_are_measured_seed_by_seed(tmp_path, synth_dir):
    out = subprocess.run([sys.executable, "experiments/studies/recipe_search.py", "--data", str(synth_dir),
                          "--recipes", "experiments/cpu", "--out", str(tmp_path), "--dry-run"],
                         cwd=REPO, capture_output=True, text=True, check=True).stdout
    steps = [line.strip("[]") for line in out.splitlines() if line.startswith("[")]
    assert steps == ["recipe_pretrain", *(f"seed_{r}_{s}" for s in range(3) for r in ("simclr", "scratch")),
                     "paper_pretrain", "paper", "study", "reports"]
    commands = [line for line in out.splitlines() if line.startswith("$")]
    paper = [c for c in commands if "tracking.experiment=skinclr-paper-cpu" in c or "studies/paper.yaml" in c]  # its own pretraining, then the grid
    assert len(paper) == 2 and "simclr_pretrain.yaml" in paper[0] and "tracking.run_name=paper_pretrain" in paper[0]
    assert " sweep --config experiments/studies/paper.yaml" in paper[1]
    assert f"--config {CPU / 'recipe_pretrain.yaml'}" in commands[0]
    assert commands[1].endswith(f"--config {CPU / 'recipe_simclr.yaml'} --set data.root={synth_dir} --set train.seed=0")
    study = next(c for c in commands if "label_efficiency.yaml" in c)
    scratch = load_config(CPU / "recipe_scratch.yaml")
    assert f"--set train.lr={scratch.train.lr}" in study and "--set finetune.balanced_sampler=true" in study


def test_the_paper_study_runs_the_paper_fine_tuning_over_inits_and_seeds():
    """The grid study is the paper's CPU-budget fine-tuning with only init and seed varied, so its
    table measures the paper's recipe and nothing else."""
    from skinclr.tune.plan import load_sweep_config

    study, _ = load_sweep_config(REPO / "experiments" / "studies" / "paper.yaml", [])
    assert study.sweep.search == "grid"
    assert study.sweep.grid == {"finetune.init": ["scratch", "runs:/paper_pretrain"], "train.seed": [0, 1, 2]}
    paper = study.flat()
    for name in ("baseline_scratch", "finetune_simclr"):
        shipped = load_config(CPU / f"{name}.yaml").flat()
        differ = {k for k in paper.keys() | shipped.keys() if paper.get(k) != shipped.get(k)}
        assert differ <= {"finetune.init", "data.workers", "tracking.experiment", "tracking.run_name"} | \
            {k for k in paper if k.startswith("sweep.")}, differ


def test_arguments_that_would_fail_a_step_hours_in_are_refused_in_one_line_before_the_first(tmp_path, synth_dir):
    script = str(REPO / "experiments" / "studies" / "recipe_search.py")
    cases = {("--data", str(tmp_path / "nope")): "no such folder",
             ("--data", str(synth_dir), "--recipes", str(tmp_path)): "no recipe_scratch.yaml, recipe_pretrain.yaml",
             ("--data", str(synth_dir), "--set", "train.epochs=-1"): "train.epochs",
             ("--data", str(synth_dir), "--set", "bogus=1"): "unknown config key 'bogus'"}
    for args, said in cases.items():
        done = subprocess.run([sys.executable, script, *args, "--out", str(tmp_path / "out")], capture_output=True,
                              text=True, timeout=300)
        err = done.stderr.strip().splitlines()
        assert done.returncode == 1 and len(err) == 1 and said in err[0], (args, done.stderr)
        assert "$" not in done.stdout and not (tmp_path / "out").exists(), args  # no step ran, nothing written
