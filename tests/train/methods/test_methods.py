"""Methods by name: the one registry, the config sections and search spaces it gives, and a new
method added as one module plus one registry line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from skinclr.config import METHOD_SECTIONS, ConfigError, load_config
from skinclr.track import store
from skinclr.train.methods import METHODS
from skinclr.tune.spaces import METHODS_SPACE, check_keys, pretrain_space
from tests.train.methods import toy_method

REPO = Path(__file__).resolve().parents[3]


def test_the_registry_is_the_one_list_of_methods():
    assert list(METHODS) == list(METHOD_SECTIONS) == ["simclr", "moco_v2", "byol"]
    cfg = load_config(None)
    assert cfg.pretrain.method == "simclr"  # the default stays the paper's method
    assert list(cfg.to_dict())[4:8] == ["pretrain", "simclr", "moco_v2", "byol"]  # sections as the file writes them
    assert {"simclr.temperature", "moco_v2.queue_size", "byol.momentum"} <= set(cfg.flat())
    assert [m.title for m in METHODS.values()] == ["SimCLR", "MoCo v2", "BYOL"]


def test_method_declarations_load_without_torch():
    code = ("import sys; from skinclr.config import load_config; load_config(None, ['pretrain.method=byol']); "
            "import skinclr.cli.main; print(sorted(m for m in ('torch', 'albumentations') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("override, says", [
    ("pretrain.method=mocov2", r"pretrain\.method' must be one of simclr, moco_v2, byol \(got 'mocov2'\)"),
    ("moco_v2.momentum=1.0", r"moco_v2\.momentum' must lie in \[0, 1\)"),
    ("moco_v2.queue_size=0", r"moco_v2\.queue_size' must be at least 1"),
    ("moco_v2.temperature=0", r"moco_v2\.temperature' must be positive"),
    ("simclr.temperature=0", r"simclr\.temperature' must be positive"),
    ("byol.momentum=-0.1", r"byol\.momentum' must lie in \[0, 1\)"),
    ("byol.momentun=0.9", r"did you mean 'byol\.momentum'"),
])
def test_bad_method_settings_are_named(override, says):
    with pytest.raises(ConfigError, match=says):
        load_config(None, [override])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_searches_its_own_ranges_and_the_shared_ones(method):
    space = pretrain_space([method])
    own = {key for key in space if key.startswith(f"{method}.")}
    assert own == set(METHODS[method].space) and own
    assert {"augment.crop_min", "train.lr"} <= set(space) and "pretrain.method" not in space
    check_keys(space, load_config(None, stage="pretrain"))  # every key takes every value it can draw


def test_a_sweep_can_choose_the_method_among_every_registered_one():
    space = pretrain_space(list(METHODS))
    assert space["pretrain.method"] == {"type": "choice", "values": list(METHODS)}
    assert set(space) == {"pretrain.method"}.union(*(pretrain_space([m]) for m in METHODS))
    check_keys(space, load_config(None, stage="pretrain"))


def test_a_method_is_one_module_plus_one_registry_line_and_pretrains_through_the_cli(synth_dir, capsys):
    from skinclr.cli.main import build_parser, main
    from skinclr.tune.plan import load_sweep_config, search_space

    with METHODS.temporary("toy", toy_method):
        assert "toy" in build_parser()._subparsers._group_actions[0].choices["pretrain"].description
        argv = ["pretrain", "--config", str(REPO / "experiments" / "cpu" / "simclr_pretrain.yaml"), "--set",
                f"data.root={synth_dir}", "data.image_size=32", "data.workers=0", "train.epochs=1",
                "train.batch_size=16", "train.max_steps_per_epoch=2", "monitor.k=5", "pretrain.method=toy",
                "toy.scale=2", "tracking.experiment=toy"]
        assert main(argv) == 0
        assert main([*argv[:-3], "pretrain.method=toy", "toy.scale=0"]) == 1
        assert "toy.scale' must be positive" in capsys.readouterr().err
        cfg, _ = load_sweep_config(REPO / "experiments" / "sweeps" / "pretrain_asha.yaml",
                                   ["pretrain.method=toy", f"data.root={synth_dir}"])
        assert "toy.scale" in search_space(cfg)[1]
        cfg, _ = load_sweep_config(REPO / "experiments" / "sweeps" / "pretrain_asha.yaml",
                                   [f"sweep.space={METHODS_SPACE}", f"data.root={synth_dir}"])
        assert "toy" in search_space(cfg)[1]["pretrain.method"]["values"]
    c = MlflowClient(store.tracking_uri())
    run = c.search_runs([c.get_experiment_by_name("toy").experiment_id])[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["pretrain.method"] == "toy" and run.data.params["toy.scale"] == "2.0"
    assert "knn_balanced_accuracy" in run.data.metrics and run.data.metrics["train_loss"] < 0  # its own loss
    assert "toy" not in METHODS and "toy" not in METHOD_SECTIONS  # the temporary registration is gone
    with pytest.raises(ConfigError, match="must be one of simclr, moco_v2, byol"):
        load_config(None, ["pretrain.method=toy"])


def test_a_module_that_lacks_a_declaration_is_refused_naming_it():
    import types

    broken = types.ModuleType("broken")
    broken.TITLE, broken.SPACE = "Broken", {"other.key": {}}
    with pytest.raises(ValueError, match=r"Settings must be a dataclass.*SPACE must map keys of its own section "
                                         r"\(broken\.\*\).*no build\(\.\.\.\) hook"):
        METHODS.add("broken", broken)
    with pytest.raises(ValueError, match="not already a config section"):
        METHODS.add("train", toy_method)
    assert "broken" not in METHODS and "train" not in METHODS
