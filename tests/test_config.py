"""Config resolution: defaults < stage defaults < YAML < --set, with errors that name the key."""
from pathlib import Path

import pytest
import yaml

from skinclr import config
from skinclr.config import ConfigError, load_config

REPO = Path(__file__).resolve().parents[1]


def test_layers_resolve_in_order(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("stage: finetune\ntrain: {epochs: 7}\nsimclr: {temperature: 0.2}\n")
    cfg = load_config(f, ["train.epochs=3", "finetune.init=imagenet", "finetune.linear_probe=true"])
    assert cfg.train.epochs == 3  # --set beats the file
    assert cfg.simclr.temperature == 0.2  # the file beats the defaults
    assert cfg.train.lr == 1e-4 and cfg.train.batch_size == 32  # fine-tune stage defaults (the paper's)
    assert cfg.augment.crop_min == 0.6
    assert cfg.finetune.init == "imagenet" and cfg.finetune.linear_probe is True
    assert cfg.experiment == "skinclr-finetune"


def test_pretrain_defaults_are_the_papers():
    cfg = load_config(None, stage="pretrain")
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.epochs) == (1e-3, 128, 100)
    assert (cfg.model.backbone, cfg.model.proj_hidden, cfg.model.proj_dim) == ("resnet18", 256, 128)
    assert cfg.experiment == "skinclr-pretrain"


def test_unknown_key_names_it_and_suggests(tmp_path):
    with pytest.raises(ConfigError, match=r"train\.epoch'.*did you mean 'train\.epochs'"):
        load_config(None, ["train.epoch=3"])
    f = tmp_path / "bad.yaml"
    f.write_text("simclr: {temprature: 0.1}\n")
    with pytest.raises(ConfigError, match=r"simclr\.temprature.*simclr\.temperature.*bad\.yaml"):
        load_config(f)


def test_a_renamed_key_loads_with_one_line_naming_the_new_key(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(config, "_told", set())
    f = tmp_path / "old.yaml"
    f.write_text("stage: finetune\nfinetune: {monitor: val_loss}\n")
    load_config(f)
    cfg = load_config(f, ["finetune.monitor_smoothing=3"])  # a second load says nothing new
    assert (cfg.finetune.select_metric, cfg.finetune.select_smoothing) == ("val_loss", 3)
    lines = capsys.readouterr().err.splitlines()
    assert lines == ["warning: config key 'finetune.monitor' is now 'finetune.select_metric'; rename it in your config",
                     "warning: config key 'finetune.monitor_smoothing' is now 'finetune.select_smoothing'; "
                     "rename it in your config"]


def test_wrong_types_and_values_are_refused():
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=lots"])
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(None, ["train.epochs=2.5"])
    with pytest.raises(ConfigError, match="simclr.temperature"):
        load_config(None, ["simclr.temperature=0"])
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])


def test_missing_or_malformed_file(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config(None, ["data.image_size=48", "augment.crop_min=0.3"], stage="pretrain")
    again = load_config(cfg.save(tmp_path / "resolved.yaml"))
    assert again == cfg
    assert cfg.flat()["data.image_size"] == 48


@pytest.mark.parametrize("path", sorted((REPO / "experiments").rglob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert cfg.stage == yaml.safe_load(path.read_text()).get("stage", "pretrain")


def test_the_128px_recipe_is_the_scratch_recipe_at_128px():
    """Its numbers are the scratch recipe's at another size: a setting changed in one and not the
    other would ship a recipe nobody measured."""
    cpu = REPO / "experiments" / "cpu"
    base, big = load_config(cpu / "recipe_scratch.yaml").flat(), load_config(cpu / "recipe_scratch_128px.yaml").flat()
    differ = {k: (base[k], big[k]) for k in base if base[k] != big[k]}
    assert differ == {"data.image_size": (64, 128),
                      "tracking.run_name": ("recipe_scratch", "recipe_scratch_128px")}


@pytest.mark.parametrize("text, key, lines", [
    ("stage: finetune\ntrain:\n  epochs: 1\ndata:\n  image_size: 32\ntrain:\n  lr: 0.001\n", "train", (2, 6)),
    ("stage: finetune\ntrain:\n  epochs: 1\n  batch_size: 8\n  epochs: 20\n", "epochs", (3, 5)),
])
def test_a_key_given_twice_is_refused_naming_it_and_both_lines(tmp_path, text, key, lines):
    path = tmp_path / "twice.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert f"'{key}'" in message and f"lines {lines[0]} and {lines[1]}" in message and str(path) in message
    assert "\n" not in message


@pytest.mark.parametrize("given, asked", [("finetune", "pretrain"), ("pretrain", "finetune")])
def test_a_config_for_one_stage_is_refused_by_the_other(tmp_path, given, asked):
    path = tmp_path / f"{given}.yaml"
    path.write_text(f"stage: {given}\ntrain:\n  epochs: 1\n")
    with pytest.raises(ConfigError, match=f"is a {given} config") as err:
        load_config(path, stage=asked)
    assert f"skinclr {given}" in str(err.value)
    assert load_config(path, stage=given).stage == given


def test_a_linear_probe_on_a_random_backbone_is_refused():
    with pytest.raises(ConfigError, match="finetune.linear_probe") as err:
        load_config(None, ["finetune.linear_probe=true"], stage="finetune")  # init: scratch by default
    assert "random backbone" in str(err.value)
    probe = load_config(None, ["finetune.linear_probe=true", "finetune.init=imagenet"], stage="finetune")
    assert probe.finetune.linear_probe


def test_a_home_folder_path_is_expanded_once_when_the_config_resolves(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["data.root=~/isic", "data.split_file=~/split.csv", "finetune.init=~/backbone.pt"],
                      stage="finetune")
    assert cfg.data.root == str(tmp_path / "isic") and cfg.data.split_file == str(tmp_path / "split.csv")
    assert cfg.finetune.init == str(tmp_path / "backbone.pt")
