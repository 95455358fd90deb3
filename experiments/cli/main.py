"""`skinclr ...`: parse, call the library, print. No logic lives here.

The command line sees both layers (the trainer library in core/ and the Ray Tune layer here), so
it lives above core: core never imports the sweep layer.

Every expected failure (bad data, config, model URI, tracking store) is one clear line on stderr
and exit 1; heavy libraries load only inside the subcommand that needs them, so `--help` and
config errors are instant. Commands that use the tracking store check it before any work.
SIGTERM is handled like Ctrl-C: the run in progress ends KILLED and resumes later.
"""
from __future__ import annotations

import argparse
import atexit
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

from skinclr.cli.commands import HANDLERS, INTERRUPT, UsageError  # noqa: E402 - after the env
from skinclr.names import DECISION_RULES, TTA_MODES  # noqa: E402
from skinclr.train.methods import METHODS  # noqa: E402 - the registry alone: no torch

EXAMPLES = {
    "data check": "skinclr data check data/isic2018",
    "data synth": "skinclr data synth data/synth --n 600 --seed 0",
    "data download": "skinclr data download isic2018 --out data/isic2018",
    "pretrain": "skinclr pretrain --config experiments/cpu/simclr_pretrain.yaml --set data.root=DIR --set train.epochs=5",
    "finetune": "skinclr finetune --config experiments/cpu/finetune_simclr.yaml --set finetune.init=runs:/RUN_ID",
    "evaluate": "skinclr evaluate --model models:/skinclr@champion --data DIR --json metrics.json",
    "predict": "skinclr predict --model models:/skinclr@champion lesion1.jpg lesion2.jpg --out probs.csv",
    "sweep": "skinclr sweep --config experiments/sweeps/pretrain_asha.yaml --set data.root=DIR",
    "promote": "skinclr promote --experiment skinclr-finetune --metric val_balanced_accuracy",
    "ensemble": "skinclr ensemble --parent STUDY_RUN_ID --tta d4 --decision-rule balanced",
    "report": "skinclr report --experiment skinclr-finetune --out reports/paper",
    "quickstart": "skinclr quickstart",
    "server": "skinclr server --host 127.0.0.1 --port 5000",
    "gc": "skinclr gc --dry-run",
}


class _Help(argparse.RawDescriptionHelpFormatter):
    """Options show their default after their help, unless the help already says it."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if not action.option_strings or "default" in text or action.default is argparse.SUPPRESS:
            return text
        if isinstance(action, argparse._StoreTrueAction):
            return f"{text} (default: off)"
        if action.default in (None, []):
            return text
        return f"{text} (default: {action.default})"


def _parser(sub, name: str, help: str, **kw) -> argparse.ArgumentParser:
    return sub.add_parser(name.split()[-1], help=help, description=help, epilog=f"example:\n  {EXAMPLES[name]}",
                          formatter_class=_Help, **kw)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config, e.g. from experiments/ (default: the stage's "
                   "built-in defaults)")
    p.add_argument("--set", dest="overrides", action="extend", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override config values, e.g. --set train.epochs=5 train.lr=1e-3 (repeatable; "
                        "default: none)")


def _tta_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tta", choices=TTA_MODES, default=None,
                   help="test-time augmentation: average the probabilities over none, flip (4 views) or d4 (8 views: "
                        "every rotation and flip); default: the model's own (finetune.tta when it was trained)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skinclr", description="SimCLR pretraining and fine-tuning for "
                                     "ISIC 2018 Task 3, tracked in MLflow, swept with Ray Tune.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="check, synthesize or download datasets")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = _parser(dsub, "data check", "validate a dataset folder (decodes every image) and summarise it")
    p.add_argument("dir", type=Path, help="dataset folder: the official ISIC 2018 training, validation or test "
                   "layout, or HAM10000's metadata and images")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    p = _parser(dsub, "data synth", "write a synthetic dataset in the official ISIC 2018 training layout")
    p.add_argument("out", type=Path, help="folder to write (reused when it holds the same set)")
    p.add_argument("--n", type=int, default=600, help="number of images (default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the set (default: %(default)s)")
    p = _parser(dsub, "data download", "download the official ISIC 2018 Task 3 archives")
    p.add_argument("dataset", choices=["isic2018"], help="which dataset (isic2018: ISIC 2018 Task 3)")
    p.add_argument("--out", type=Path, required=True, help="folder for the archives and the extracted data: the "
                   "training split in it, the others in its validation/ and test/ (required)")
    p.add_argument("--parts", nargs="*", default=None, help="only these splits (training, validation, test) or "
                   "archive names (default: all seven archives)")
    p.add_argument("--base-url", default=None, help="mirror serving the official file names "
                   "(default: the ISIC challenge's own host)")

    p = _parser(sub, "pretrain", f"self-supervised pretraining ({' | '.join(METHODS)}: pretrain.method): one MLflow "
                "run (resumes an unfinished run of the same config)")
    _config_args(p)
    p = _parser(sub, "finetune", "fine-tune or linear-probe a classifier from scratch, ImageNet or a pretraining run")
    _config_args(p)

    p = _parser(sub, "evaluate", "metrics of a model on a labelled folder, logged to MLflow")
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, runs:/RUN_ID/model or a path (required)")
    p.add_argument("--data", required=True, type=Path, help="labelled folder in the official layout, unseen by the "
                   "model for test numbers (required)")
    p.add_argument("--json", type=Path, default=None, help="also write the metrics here (default: none)")
    p.add_argument("--experiment", default="skinclr-evaluate", help="MLflow experiment of the evaluation run "
                   "(default: %(default)s)")
    _tta_arg(p)
    p = _parser(sub, "predict", "class probabilities for images")
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, runs:/RUN_ID/model or a path (required)")
    p.add_argument("images", nargs="+", type=Path, help="image files (JPEG or PNG), or folders of them")
    p.add_argument("--out", type=Path, default=None, help="CSV file for the probabilities (default: print only)")
    p.add_argument("--format", choices=("skinclr", "isic"), default="skinclr",
                   help="skinclr: path, probabilities, predicted class; isic: the ISIC 2018 submission (image id "
                        "and the seven probabilities, no other column), which isic-challenge-scoring reads "
                        "(default: %(default)s)")
    _tta_arg(p)

    p = _parser(sub, "sweep", "a Ray Tune sweep (ASHA + Optuna): one MLflow parent run, one child run per trial")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue a sweep whose driver stopped (default: off, "
                   "a new sweep)")
    p = _parser(sub, "ensemble", "one model from several fine-tune runs: their mean probability, scored and logged as "
                "a run (promoted, predicted and served like any model)")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--runs", nargs="+", metavar="RUN_ID",
                       help="the member runs (no default: give --runs, --parent or --top)")
    group.add_argument("--parent", metavar="RUN_ID",
                       help="every finished child with a model of this study or sweep run (no default)")
    group.add_argument("--top", type=int, metavar="K", help="the best K runs of --experiment on one split (no default)")
    p.add_argument("--experiment", default="skinclr-finetune", help="where --top looks (default: %(default)s)")
    p.add_argument("--into", default="", help="experiment of the ensemble run (default: the first member's)")
    _tta_arg(p)
    p.add_argument("--decision-rule", choices=DECISION_RULES, default="none",
                   help="balanced: per-class offsets fitted on the members' shared val side, or out of fold; "
                        "none: the highest mean probability wins (default: %(default)s)")
    p.add_argument("--name", default="", help="run name (default: 'ensemble of N')")
    p.add_argument("--data", default=None, metavar="DIR", help="the dataset folder the members were trained on "
                   "(default: where the first member read it; its held-out images must be unchanged)")

    p = _parser(sub, "promote", "register the best run's model; move alias champion only if it is better")
    p.add_argument("--experiment", default="skinclr-finetune", help="experiment whose finished runs compete "
                   "(default: %(default)s)")
    p.add_argument("--metric", default="val_balanced_accuracy", help="what decides (a loss is minimised; "
                   "default: %(default)s)")
    p.add_argument("--name", default="skinclr", help="registered model name (default: %(default)s)")
    p.add_argument("--run", default=None, help="promote this run instead of the best one (default: the best run)")
    p.add_argument("--split", default=None, metavar="FINGERPRINT", help="rank only runs validated on this "
                   "split_fingerprint (default: the champion's split)")
    p.add_argument("--force", action="store_true", help="move the alias even if not better (default: off)")
    p.add_argument("--rollback", action="store_true", help="swap champion and previous back (default: off)")
    p = _parser(sub, "report", "rebuild the paper's tables and figures from MLflow runs")
    p.add_argument("--experiment", action="append", default=None, help="experiment(s) to read (repeatable; "
                   "default: skinclr-finetune)")
    p.add_argument("--out", type=Path, default=Path("reports"), help="folder for report.md, tables and figures "
                   "(default: %(default)s)")
    p.add_argument("--study", default=None, metavar="RUN",
                   help="the grid study (parent run id or name) for the label-efficiency section "
                        "(default: the newest study over data.label_fraction in the experiments)")
    p = _parser(sub, "quickstart", "synthetic data, a small sweep, fine-tune, evaluate, promote: minutes on a CPU")
    p.add_argument("--workdir", type=Path, default=Path("quickstart"), help="folder for its data and Ray files "
                   "(default: %(default)s)")
    p = _parser(sub, "gc", "delete the resume checkpoints of runs that ended (their models and backbones stay "
                "in MLflow)")
    p.add_argument("--unfinished", action="store_true", help="also those of KILLED and FAILED runs, which then "
                   "restart from epoch 1 instead of resuming (default: off)")
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted (default: off)")
    p = _parser(sub, "server", "an MLflow tracking server (UI + REST) over the project's store")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on; 0.0.0.0 for every interface "
                   "(default: %(default)s, this machine only)")
    p.add_argument("--port", type=port_number, default=5000, help="TCP port, 1-65535 (default: %(default)s)")
    p.add_argument("--backend-store-uri", default=None, help="the store it serves: sqlite:///PATH/mlflow.db or "
                   "postgresql://USER@HOST/DB (default: the project's store, $MLFLOW_TRACKING_URI or "
                   "sqlite:///mlruns/mlflow.db)")
    p.add_argument("--artifacts-destination", default=None, help="where it keeps artifacts: a folder or "
                   "s3://bucket/path (default: artifacts/ beside a SQLite store; required for any other store)")
    return parser


def port_number(text: str) -> int:
    """A TCP port for argparse: one usage line for anything else."""
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 1 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a TCP port; give a number from 1 to 65535")
    return port


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean 'the input is wrong', printed as one line instead of a traceback.

    Only modules already imported are looked at: an error cannot come from one that is not."""
    errors: list[type[BaseException]] = [FileNotFoundError, UsageError]
    for module, name in (("skinclr.config", "ConfigError"), ("skinclr.data.problems", "DataError"), ("skinclr.train.models", "ModelError"),
                         ("skinclr.track.store", "StoreError"), ("skinclr.runtime", "BusyError"),
                         ("skinclr.runtime", "NoSpaceError"),
                         ("skinclr.serve.uris", "ModelNotFound"), ("skinclr.track.candidates", "PromotionError"), ("skinclr.report.paper", "ReportError"),
                         ("skinclr.data.fetch", "DownloadError")):
        if module in sys.modules and hasattr(sys.modules[module], name):
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def _terminate(signum, frame) -> None:
    """SIGTERM does what Ctrl-C does (Ray Tune's own handler, where one is installed, included)."""
    INTERRUPT["signal"] = signal.SIGTERM
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def _interrupted(command: str) -> str:
    tracking = sys.modules.get("skinclr.track.tracking")
    killed = list(tracking.killed_runs) if tracking else []
    name = "terminated" if INTERRUPT["signal"] == signal.SIGTERM else "interrupted"
    if command == "sweep" and tracking and tracking.opened_runs:
        return f"{name}; continue the sweep with the same command and --resume"
    if killed and INTERRUPT["resumable"]:
        return (f"{name}; run {', '.join(killed)} is marked KILLED and resumes from its last finished epoch when "
                "the same command runs again")
    if killed:
        return f"{name}; run {', '.join(killed)} is marked KILLED (tracking.resume is off: a new run starts next time)"
    return f"{name} before any run was opened; nothing to resume"


def _disk_full(err: BaseException) -> str | None:
    """A full disk met anywhere (MLflow's own writes included): one line, never a traceback."""
    from skinclr.runtime import out_of_space

    if not out_of_space(err):
        return None
    from skinclr.track.store import first_line, root_cause, sqlite_path, tracking_uri

    db = sqlite_path(tracking_uri())
    where = f"{db.parent} (the tracking store)" if db is not None else "a disk this command writes to"
    return (f"{where}: no space left on device ({first_line(root_cause(err))}); free space there and run the "
            "same command again to resume")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # the command that reproduces its runs
    own_sigterm = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if own_sigterm:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return HANDLERS[args.command](args)
    except KeyboardInterrupt:
        print(_interrupted(args.command), file=sys.stderr)
        return 128 + int(INTERRUPT["signal"])
    except Exception as err:  # noqa: BLE001 - narrowed just below
        if isinstance(err, expected_errors()):
            for line in getattr(err, "problems", None) or str(err).splitlines() or [repr(err)]:
                print(f"error: {line}", file=sys.stderr)
            return 1
        full = _disk_full(err)
        if full:
            print(f"error: {full}", file=sys.stderr)
            return 1
        raise
    finally:
        if own_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def run() -> None:
    """The `skinclr` command: `main`, then Python's exit without its teardown. Joining the threads,
    the exit handlers (MLflow's, Ray's, logging's, temporary folders') and flushing all run as in
    a normal exit; only the freeing of every loaded module and object is left to the OS, which
    with torch, Ray and MLflow loaded took 1-1.5 s after the work was done."""
    code = main()
    threading._shutdown()  # what a normal exit does first: wait for the non-daemon threads
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a reader that went away (`| head`) is no error
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
