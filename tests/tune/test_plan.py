"""A sweep resolved once, before Ray starts: its plan, and every range checked against the config's
own validation."""
from pathlib import Path

import pytest
import yaml

from skinclr import names
from skinclr.config import ConfigError
from skinclr.tune.plan import load_run_config, resolve_plan

REPO = Path(__file__).resolve().parents[2]
SWEEPS = REPO / "experiments" / "sweeps"


def space_file(tmp_path: Path, space: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    return path


@pytest.mark.parametrize("key, spec", [
    ("augment.crop_min", {"type": "uniform", "low": 0.5, "high": 1.5}),  # above (0, 1]
    ("finetune.label_smoothing", {"type": "choice", "values": [0.1, 1.0]}),  # 1.0 is outside [0, 1)
    ("train.batch_size", {"type": "randint", "low": 1, "high": 64}),  # 1 is below 2
])
def test_a_range_outside_what_a_run_accepts_is_refused_before_ray(tmp_path, synth_dir, key, spec):
    cfg = load_run_config(SWEEPS / "finetune_asha.yaml", [f"data.root={synth_dir}", f"sweep.storage={tmp_path}",
                                                           f"sweep.space={space_file(tmp_path, {key: spec})}"])
    with pytest.raises(ConfigError) as err:
        resolve_plan(cfg)
    assert key in str(err.value) and "must" in str(err.value)


def test_randint_is_checked_at_its_last_value(tmp_path, synth_dir):
    """Ray's randint never draws `high`: a range ending just past the valid values is fine."""
    space = {"finetune.lr_patience": {"type": "randint", "low": 0, "high": 3}}
    cfg = load_run_config(SWEEPS / "finetune_asha.yaml", [f"data.root={synth_dir}", f"sweep.storage={tmp_path}",
                                                           f"sweep.space={space_file(tmp_path, space)}"])
    assert resolve_plan(cfg).stage.space["finetune.lr_patience"]["high"] == 3


def test_the_plan_holds_each_stage_resolved_once(tmp_path, synth_dir):
    """A pipeline's plan: the pretrain sweep and its fine-tuning resolved, folders named, the fine-tune
    config read here and nowhere below."""
    cfg = load_run_config(SWEEPS / "pipeline.yaml", [f"data.root={synth_dir}", f"sweep.storage={tmp_path}"])
    plan = resolve_plan(cfg, command="skinclr sweep --config experiments/sweeps/pipeline.yaml")
    assert plan.stage is None and plan.pretrain is not None
    # every stage tags its runs with the command that reproduces the pipeline
    assert {s.command for s in plan.stages()} == {plan.command} == {"skinclr sweep --config experiments/sweeps/pipeline.yaml"}
    assert len(plan.stages()) == 2
    assert plan.pretrain.folder == tmp_path / f"{plan.folder.name}-pretrain"
    assert plan.pretrain.space and plan.pretrain.cfg.data.root == cfg.data.root
    fine = plan.finetune.cfg if plan.finetune else plan.finetune_run
    assert fine.stage == "finetune" and fine.data.root == cfg.data.root and fine.experiment == cfg.experiment
    assert plan.finetune_file.is_file()


def test_a_second_sweep_of_the_same_config_is_refused_and_resume_needs_one(tmp_path, synth_dir):
    cfg = load_run_config(SWEEPS / "finetune_asha.yaml", [f"data.root={synth_dir}", f"sweep.storage={tmp_path}"])
    with pytest.raises(ConfigError, match="nothing to resume"):
        resolve_plan(cfg, resume=True)
    plan = resolve_plan(cfg)
    plan.folder.mkdir(parents=True)
    (plan.folder / names.SWEEP_STATE_FILE).write_text("{}")
    with pytest.raises(ConfigError, match="already lives in"):
        resolve_plan(cfg)
    assert resolve_plan(cfg, resume=True).stage.resume
