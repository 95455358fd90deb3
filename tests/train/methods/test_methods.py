"""Methods by name: the registry, their config sections and checks, and their search spaces."""
from __future__ import annotations

from pathlib import Path

import pytest

from skinclr.config import PRETRAIN_METHODS, ConfigError, load_config
from skinclr.train.methods import METHODS
from skinclr.train.methods.base import Pretraining
from skinclr.tune.spaces import check_keys, load_space

SPACES = Path(__file__).resolve().parents[3] / "search_spaces"


def test_every_method_has_a_config_section_and_a_registry_entry():
    assert set(METHODS) == set(PRETRAIN_METHODS) == {"simclr", "moco_v2", "byol"}
    assert all(issubclass(m, Pretraining) for m in METHODS.values())
    assert load_config(None).pretrain.method == "simclr"  # the default stays the paper's method


@pytest.mark.parametrize("override, says", [
    ("pretrain.method=mocov2", r"pretrain\.method' must be one of simclr, moco_v2, byol \(got 'mocov2'\)"),
    ("moco_v2.momentum=1.0", r"moco_v2\.momentum' must lie in \[0, 1\)"),
    ("moco_v2.queue_size=0", r"moco_v2\.queue_size' must be at least 1"),
    ("moco_v2.temperature=0", r"moco_v2\.temperature' must be positive"),
    ("byol.momentum=-0.1", r"byol\.momentum' must lie in \[0, 1\)"),
    ("byol.momentun=0.9", r"did you mean 'byol\.momentum'"),
])
def test_bad_method_settings_are_named(override, says):
    with pytest.raises(ConfigError, match=says):
        load_config(None, [override])


@pytest.mark.parametrize("method", sorted(METHODS))
def test_each_method_has_a_search_space_that_fixes_it(method):
    space = load_space(SPACES / f"pretrain_{method}.yaml")
    assert space["pretrain.method"] == {"type": "choice", "values": [method]}
    check_keys(space, load_config(None, stage="pretrain"))  # every key takes every value it can draw


def test_a_sweep_can_choose_the_method():
    space = load_space(SPACES / "pretrain_methods.yaml")
    assert sorted(space["pretrain.method"]["values"]) == sorted(METHODS)
    check_keys(space, load_config(None, stage="pretrain"))
    per_method = set().union(*(load_space(SPACES / f"pretrain_{m}.yaml") for m in METHODS))
    assert set(space) == per_method  # the union of the per-method spaces, nothing more or less
