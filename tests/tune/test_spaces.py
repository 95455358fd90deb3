"""What a sweep's parent run says it searched: each swept key's distribution, not the base value."""
from __future__ import annotations

from skinclr.config import Config
from skinclr.tune.spaces import distribution, grid_space, narrow, parent_params, pretrain_space


def test_each_kind_of_distribution_reads_as_one_line():
    assert distribution({"type": "loguniform", "low": 0.05, "high": 0.5}) == "loguniform(0.05, 0.5)"
    assert distribution({"type": "uniform", "low": 0.08, "high": 0.6}) == "uniform(0.08, 0.6)"
    assert distribution({"type": "randint", "low": 5, "high": 40}) == "randint(5, 40)"
    assert distribution({"type": "choice", "values": ["simclr", "byol"]}) == "choice(['simclr', 'byol'])"
    assert distribution(grid_space({"train.seed": [0, 1, 2]})["train.seed"]) == "grid([0, 1, 2])"


def test_parent_params_show_the_space_for_swept_keys_and_the_config_elsewhere():
    cfg = Config()
    cfg.simclr.temperature = 0.5  # the base value no trial trains with
    space = narrow(pretrain_space(["simclr"]), {"simclr.temperature": {"low": 0.05, "high": 0.5},
                                                "augment.crop_min": 0.2, "train.lr": [1.0e-4, 1.0e-3]})
    params = parent_params(cfg.flat(), space)
    assert params["simclr.temperature"] == "loguniform(0.05, 0.5)"
    assert params["train.lr"] == "choice([0.0001, 0.001])"
    assert params["augment.color_strength"] == "uniform(0.2, 1.0)"
    assert params["augment.crop_min"] == 0.2  # fixed by the sweep: every trial's value
    assert params["train.epochs"] == cfg.train.epochs and params["model.backbone"] == cfg.model.backbone
    assert set(params) == set(cfg.flat())
