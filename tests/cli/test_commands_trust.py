"""The CLI under hostile use: a bad store, bad values, two processes on one run, signals, a bad
image among good ones, an unwritable output. Each case gets one clear line (never a traceback),
loses nothing already written and leaves no MLflow run RUNNING."""
from __future__ import annotations

import argparse
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from skinclr.track import tracking
from skinclr.cli.main import build_parser, main
from skinclr.names import CLASSES
from skinclr.train.models import build_classifier

from skinclr.serve.pyfunc import save_pyfunc
from skinclr.data.synth import make_synthetic
from skinclr.track.store import checkpoint_root
from tests.track.test_server import free_port

REPO = Path(__file__).resolve().parents[2]
TINY = ["data.image_size=32", "train.batch_size=16", "data.workers=0", "train.max_steps_per_epoch=2",
        "monitor.max_bank=64", "monitor.k=5"]


def cli(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "skinclr.cli.main", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


def one_error(stderr: str) -> str:
    """The single `error:` line a failure prints (and nothing that looks like a traceback)."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def pretrain_cmd(root: Path, *extra: str) -> list[str]:
    return ["pretrain", "--config", str(REPO / "experiments" / "paper" / "simclr_pretrain.yaml"),
            "--set", f"data.root={root}", *TINY, *extra]


def runs_of(experiment: str):
    c = tracking.client()
    exp = c.get_experiment_by_name(experiment)
    return c.search_runs([exp.experiment_id]) if exp else []


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """An untrained classifier as a real pyfunc folder: enough to predict and evaluate with."""
    torch.manual_seed(0)
    return save_pyfunc(tmp_path_factory.mktemp("model") / "model", build_classifier("resnet18").state_dict(),
                       "resnet18", 32, "center_crop")


# ---------------------------------------------------------------------------------------------
# Flags and config values


def test_every_option_says_what_it_does_and_its_default():
    parser = build_parser()
    commands = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)][0].choices
    seen = 0
    for name, sub in commands.items():
        nested = [a for a in sub._actions if isinstance(a, argparse._SubParsersAction)]
        for command in (nested[0].choices.values() if nested else [sub]):
            for action in command._actions:
                if isinstance(action, argparse._HelpAction):
                    continue
                seen += 1
                assert action.help, f"{command.prog} {action.option_strings or action.dest}: no help"
                shown = command._get_formatter()._expand_help(action)  # what --help prints for it
                if action.option_strings and not action.required:
                    assert "default" in shown, f"{command.prog} {action.option_strings}: {shown!r} has no default"
    assert seen >= 30  # the check ran over every command


def test_set_takes_several_pairs_at_once(synth_dir, capsys):
    args = build_parser().parse_args(["pretrain", "--set", "train.epochs=2", "train.lr=1e-3", "--set", "train.seed=3"])
    assert args.overrides == ["train.epochs=2", "train.lr=1e-3", "train.seed=3"]
    assert main(["pretrain", "--set", f"data.root={synth_dir}", "train.epochs=2", "train.lr=inf"]) == 1
    assert "train.lr" in one_error(capsys.readouterr().err)


@pytest.mark.parametrize("override, culprit", [
    ("train.lr=inf", "train.lr"), ("monitor.every=0", "monitor.every"), ("data.workers=-1", "data.workers"),
    ("finetune.init=runs:/it's", "finetune.init"), ("data.root=/nowhere/at/all", "data.root"),
    ("finetune.lr_factor=1.5", "finetune.lr_factor"), ("augment.blur_prob=2", "augment.blur_prob"),
])
def test_a_bad_value_is_named_before_anything_heavy_loads(override, culprit, synth_dir):
    """Validation needs neither torch nor MLflow, so the answer comes at once."""
    probe = ("import sys; from skinclr.cli.main import main; code = main(sys.argv[1:]); "
             "print(sorted(m for m in ('torch', 'mlflow', 'ray', 'albumentations') if m in sys.modules)); "
             "sys.exit(code)")
    done = subprocess.run([sys.executable, "-c", probe, "finetune", "--set", f"data.root={synth_dir}", override],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert culprit in one_error(done.stderr)
    assert done.stdout.strip() == "[]"


def test_cuda_without_a_gpu_fails_before_a_run_opens(synth_dir, capsys):
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    assert main(pretrain_cmd(synth_dir, "train.device=cuda", "tracking.experiment=cuda-test")) == 1
    assert "train.device=cuda" in one_error(capsys.readouterr().err)
    assert runs_of("cuda-test") == []


def test_too_few_images_for_a_split_is_one_line(tmp_path, capsys):
    tiny = make_synthetic(tmp_path / "tiny", n=14, seed=0)
    argv = ["finetune", "--config", str(REPO / "experiments" / "paper" / "baseline_scratch.yaml"),
            "--set", f"data.root={tiny}", *TINY, "train.epochs=1", "tracking.experiment=tiny-test"]
    assert main(argv) == 1
    one_error(capsys.readouterr().err)
    assert all(r.info.status != "RUNNING" for r in runs_of("tiny-test"))


# ---------------------------------------------------------------------------------------------
# The tracking store


@pytest.mark.slow
def test_a_store_that_cannot_work_stops_every_command_with_one_line(synth_dir, model_dir, tmp_path):
    nothing = f"http://127.0.0.1:{free_port()}"
    stores = {nothing: "nothing answers", "sqlite:////proc/skinclr/x.db": "cannot write in /proc",
              str(tmp_path): "folder path"}
    commands = {"pretrain": pretrain_cmd(synth_dir),
                "evaluate": ["evaluate", "--model", str(model_dir), "--data", str(synth_dir)],
                "promote": ["promote"], "report": ["report", "--out", str(tmp_path / "r")],
                "sweep": ["sweep", "--config", str(REPO / "experiments" / "sweeps" / "pretrain_asha.yaml"),
                          "--set", f"data.root={synth_dir}"],
                "gc": ["gc"], "predict": ["predict", "--model", "models:/skinclr@champion", "x.jpg"]}
    for uri, why in stores.items():
        for name, argv in commands.items() if uri == nothing else [("pretrain", commands["pretrain"])]:
            done = cli(*argv, env={"MLFLOW_TRACKING_URI": uri}, timeout=60)  # never MLflow's minutes of retries
            line = one_error(done.stderr)
            assert done.returncode == 1 and uri in line and why in line, (name, line)


@pytest.mark.slow
def test_ctrl_c_before_any_run_promises_no_resume(synth_dir):
    """Interrupted while the store is still being checked: nothing was opened, and it says so."""
    with socket.socket() as silent:  # accepts the connection, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{silent.getsockname()[1]}"}
        proc = subprocess.Popen([sys.executable, "-m", "skinclr.cli.main", *pretrain_cmd(synth_dir)], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        silent.settimeout(60)
        conn, _ = silent.accept()  # the store check is under way
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        conn.close()
    assert proc.returncode == 130 and "Traceback" not in err
    assert "before any run was opened; nothing to resume" in err and "resumes" not in err


# ---------------------------------------------------------------------------------------------
# One process per run; SIGTERM like Ctrl-C; a finished run keeps no resume state


@pytest.mark.slow
def test_a_second_identical_command_refuses_and_sigterm_leaves_a_resumable_run(synth_dir):
    cmd = [sys.executable, "-m", "skinclr.cli.main", *pretrain_cmd(synth_dir, "train.epochs=4", "tracking.experiment=twice")]
    first = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    while not list(checkpoint_root().glob("*/checkpoint.pt")) and time.monotonic() < deadline:
        assert first.poll() is None, first.stderr.read()[-3000:]
        time.sleep(0.2)
    first.send_signal(signal.SIGSTOP)  # held mid-run, however long the second takes to start
    [run] = runs_of("twice")

    second = cli(*cmd[3:])
    line = one_error(second.stderr)
    assert second.returncode == 1 and run.info.run_id in line and f"pid {first.pid}" in line
    assert len(runs_of("twice")) == 1

    first.send_signal(signal.SIGTERM)
    first.send_signal(signal.SIGCONT)
    _, err = first.communicate(timeout=120)
    assert first.returncode == 143 and "Traceback" not in err
    assert f"run {run.info.run_id} is marked KILLED and resumes" in err
    [killed] = runs_of("twice")
    assert killed.info.status == "KILLED"

    again = cli(*cmd[3:])
    assert again.returncode == 0, again.stderr[-3000:]
    [done] = runs_of("twice")
    assert done.info.run_id == run.info.run_id and done.info.status == "FINISHED"
    steps = [m.step for m in tracking.client().get_metric_history(run.info.run_id, "train_loss")]
    assert steps == [1, 2, 3, 4]
    assert not (checkpoint_root() / run.info.run_id).exists()  # its resume state went with the finish
    files = {a.path for a in tracking.client().list_artifacts(run.info.run_id, "checkpoints")}
    assert files == {"checkpoints/backbone_best.pt", "checkpoints/backbone_last.pt"}


# ---------------------------------------------------------------------------------------------
# Partial failure keeps the good part; outputs checked before the work


def test_predict_keeps_the_good_images_and_names_each_bad_one(synth_dir, model_dir, tmp_path, capsys):
    good = sorted((synth_dir / "ISIC2018_Task3_Training_Input").glob("*.jpg"))[:3]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(good[0].read_bytes()[:300])
    missing = tmp_path / "missing.jpg"
    images = [good[0], broken, good[1], missing, good[2]]
    out = tmp_path / "probs.csv"
    assert main(["predict", "--model", str(model_dir), *map(str, images), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2 and "broken.jpg" in errors[0] and "missing.jpg" in errors[1]
    written = pd.read_csv(out)
    assert written["image"].tolist() == list(map(str, images))
    ok = written["error"].isna()
    assert ok.tolist() == [True, False, True, False, True]
    assert written.loc[ok, list(CLASSES)].sum(axis=1).round(6).eq(1.0).all()
    assert written.loc[~ok, list(CLASSES)].isna().all().all()


def test_outputs_that_cannot_be_written_are_refused_before_the_work(synth_dir, model_dir, tmp_path, capsys):
    a_file = tmp_path / "a-file"
    a_file.write_text("")
    for flag, argv in {
        "--json": ["evaluate", "--model", str(model_dir), "--data", str(synth_dir), "--json", f"{a_file}/m.json"],
        "--out": ["predict", "--model", str(model_dir), "x.jpg", "--out", "/proc/skinclr/p.csv"],
    }.items():
        assert main(argv) == 1
        line = one_error(capsys.readouterr().err)
        assert line.startswith(f"error: {flag} ")
    assert tracking.client().get_experiment_by_name("skinclr-evaluate") is None  # nothing was evaluated


def test_a_random_file_as_model_is_one_line_without_torchs_advice(tmp_path, synth_dir, capsys):
    junk = tmp_path / "model.pt"
    junk.write_bytes(os.urandom(4096))
    image = sorted((synth_dir / "ISIC2018_Task3_Training_Input").glob("*.jpg"))[0]
    assert main(["predict", "--model", str(junk), str(image)]) == 1
    line = one_error(capsys.readouterr().err)
    assert "model.pt" in line and "weights_only" not in line


# ---------------------------------------------------------------------------------------------
# Quiet


@pytest.mark.slow
def test_a_normal_run_prints_no_third_party_warnings(synth_dir):
    done = cli("finetune", "--config", str(REPO / "experiments" / "paper" / "baseline_scratch.yaml"),
               "--set", f"data.root={synth_dir}", *TINY, "train.epochs=1")
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", line).strip() for line in done.stderr.replace("\r", "\n").splitlines()]
    noise = [line for line in lines if line and "%|" not in line]  # progress bars only
    assert noise == [], noise


@pytest.mark.parametrize("extra", [("train.batch_size=512",), ("data.label_fraction=0.05", "train.batch_size=64")])
def test_a_run_that_would_train_nothing_is_refused_before_it_opens(synth_dir, capsys, extra):
    """Every batch dropped as incomplete: one line with the image count, the batch size and the
    fix, and no run at all (least of all a FINISHED, promotable one)."""
    sets = [s for s in TINY if not s.startswith("train.batch_size")]
    argv = ["finetune", "--config", str(REPO / "experiments" / "paper" / "baseline_scratch.yaml"),
            "--set", f"data.root={synth_dir}", *sets, "train.epochs=1", "tracking.experiment=nothing-test", *extra]
    assert main(argv) == 1
    line = one_error(capsys.readouterr().err)
    assert "train.batch_size" in line and "image" in line and "nothing would train" in line
    assert runs_of("nothing-test") == []


@pytest.mark.parametrize("port", ["70000", "0", "http"])
def test_a_port_out_of_range_is_one_usage_line(port):
    done = subprocess.run([sys.executable, "-m", "skinclr.cli", "server", "--port", port], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"{port!r} is not a TCP port" in done.stderr.splitlines()[-1]


@pytest.mark.parametrize("command", ["predict", "evaluate"])
@pytest.mark.parametrize("uri", ["runs:/0123456789abcdef0123456789abcdef/model", "models:/skinclr@champion"])
def test_a_model_uri_that_names_nothing_answers_before_torch_loads(command, uri, synth_dir, tmp_path):
    """A wrong run id or alias is one line, found with the store alone: no torch import to wait for."""
    probe = ("import sys; from skinclr.cli.main import main; code = main(sys.argv[1:]); "
             "print(sorted(m for m in ('torch', 'torchvision', 'sklearn', 'mlflow') if m in sys.modules)); sys.exit(code)")
    target = ["--data", str(synth_dir)] if command == "evaluate" else [str(next(synth_dir.rglob("*.jpg")))]
    done = subprocess.run([sys.executable, "-c", probe, command, "--model", uri, *target], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert uri in one_error(done.stderr) and done.stdout.strip() == "[]"


@pytest.fixture
def small_disk(tmp_path):
    """A real filesystem (tmpfs) of the size asked for, unmounted after the test."""
    mounted = []

    def mount(size: str) -> Path:
        folder = tmp_path / f"disk-{size}"
        folder.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                          capture_output=True).returncode != 0:
            pytest.skip("mounting a tmpfs needs root")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def test_a_full_checkpoint_disk_is_one_line_and_leaves_no_temporary_file(synth_dir, small_disk, capsys, monkeypatch):
    tiny = small_disk("512k")  # smaller than any checkpoint
    monkeypatch.setenv("SKINCLR_CHECKPOINTS", str(tiny))
    argv = ["finetune", "--config", str(REPO / "experiments" / "paper" / "baseline_scratch.yaml"),
            "--set", f"data.root={synth_dir}", *TINY, "train.epochs=1", "tracking.experiment=full-disk"]
    assert main(argv) == 1
    line = one_error(capsys.readouterr().err)
    assert "no space left on device" in line and str(tiny) in line and "resumes" in line
    assert not [p for p in tiny.rglob("*") if p.name.endswith(".tmp")]
    [run] = runs_of("full-disk")
    assert run.info.status == "FAILED"


@pytest.mark.parametrize("when", ["new store", "store that filled up"])
def test_a_full_store_disk_is_one_line_never_retried_as_an_outage(synth_dir, small_disk, tmp_path, when):
    """The tracking store's own disk is full: said at once, not taken for a server gone away."""
    disk = small_disk("512k" if when == "new store" else "8m")
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{disk}/mlflow.db", "SKINCLR_TRACKING_RETRY_S": "600",
           "SKINCLR_CHECKPOINTS": str(tmp_path / "checkpoints")}
    if when == "store that filled up":
        subprocess.run([sys.executable, "-c", "from skinclr.track import tracking; tracking.client().search_experiments()"],
                       env=env, check=True, timeout=120)
        subprocess.run(["dd", "if=/dev/zero", f"of={disk / 'filler'}", "bs=64k"], capture_output=True)
    argv = ["finetune", "--config", str(REPO / "experiments" / "paper" / "baseline_scratch.yaml"),
            "--set", f"data.root={synth_dir}", *TINY, "train.epochs=1", "tracking.experiment=full-store"]
    done = subprocess.run([sys.executable, "-m", "skinclr.cli", *argv], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)  # a retried outage would wait 600 s
    assert done.returncode == 1
    line = one_error(done.stderr)
    assert "no space left on device" in line and str(disk) in line
    assert "unreachable" not in done.stderr and "retrying" not in done.stderr


def test_a_run_says_what_it_is_and_the_command_that_made_it(synth_dir):
    argv = ["finetune", "--config", str(REPO / "experiments" / "paper" / "baseline_scratch.yaml"),
            "--set", f"data.root={synth_dir}", *TINY, "train.epochs=1", "tracking.run_name=", "train.seed=3",
            "tracking.experiment=named"]
    assert main(argv) == 0
    [run] = runs_of("named")
    assert run.info.run_name == "finetune scratch seed 3"
    assert run.data.tags["skinclr.command"].startswith("skinclr finetune --config ")
    assert run.data.tags["skinclr.command"].endswith("train.seed=3 tracking.experiment=named")
