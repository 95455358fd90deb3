"""The shipped recipes and the script that measures them: the SimCLR recipe is the scratch recipe
with another init (so the two compare inits alone), and `recipe_search.py --recipes` runs them
seed by seed, SimCLR and scratch in turn, then the paper's recipe from its own pretraining, with
the study fine-tuning on the scratch recipe."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from core.config import load_config

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
                     "paper_pretrain", *(f"paper_{r}_{s}" for s in range(3) for r in ("baseline_scratch", "finetune_simclr")),
                     "study", "reports"]
    commands = [line for line in out.splitlines() if line.startswith("$")]
    paper = [c for c in commands if "tracking.experiment=skinclr-paper-cpu" in c]  # the paper's own pretraining, then both inits
    assert len(paper) == 7 and "simclr_pretrain.yaml" in paper[0] and "tracking.run_name=paper_pretrain" in paper[0]
    simclr = [c for c in paper if "finetune_simclr.yaml" in c]
    assert len(simclr) == 3 and all("finetune.init=runs:/paper_pretrain" in c for c in simclr)
    assert f"--config {CPU / 'recipe_pretrain.yaml'}" in commands[0]
    assert commands[1].endswith(f"--config {CPU / 'recipe_simclr.yaml'} --set data.root={synth_dir} --set train.seed=0")
    study = next(c for c in commands if "label_efficiency.yaml" in c)
    scratch = load_config(CPU / "recipe_scratch.yaml")
    assert f"--set train.lr={scratch.train.lr}" in study and "--set finetune.balanced_sampler=true" in study
