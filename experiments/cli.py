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
import os
import signal
import sys
import tempfile
import threading
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

EXAMPLES = {
    "data check": "skinclr data check ../shared/data/isic2018-task3-200x150",
    "data synth": "skinclr data synth data/synth --n 600 --seed 0",
    "data download": "skinclr data download isic2018 --out data/isic2018",
    "pretrain": "skinclr pretrain --config experiments/cpu/simclr_pretrain.yaml --set data.root=DIR --set train.epochs=5",
    "finetune": "skinclr finetune --config experiments/cpu/finetune_simclr.yaml --set finetune.init=runs:/RUN_ID",
    "evaluate": "skinclr evaluate --model models:/skinclr@champion --data DIR --json metrics.json",
    "predict": "skinclr predict --model models:/skinclr@champion lesion1.jpg lesion2.jpg --out probs.csv",
    "sweep": "skinclr sweep --config experiments/sweeps/pretrain_asha.yaml --set data.root=DIR",
    "promote": "skinclr promote --experiment skinclr-finetune --metric val_balanced_accuracy",
    "report": "skinclr report --experiment skinclr-finetune --out reports/paper",
    "quickstart": "skinclr quickstart",
    "server": "skinclr server --host 127.0.0.1 --port 5000",
    "gc": "skinclr gc --dry-run",
}


class UsageError(ValueError):
    """A command-line value that cannot work (an output path that cannot be written)."""


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skinclr", description="SimCLR pretraining and fine-tuning for "
                                     "ISIC 2018 Task 3, tracked in MLflow, swept with Ray Tune.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="check, synthesize or download datasets")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = _parser(dsub, "data check", "validate a dataset folder (decodes every image) and summarise it")
    p.add_argument("dir", type=Path, help="dataset folder in the official ISIC 2018 layout")
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    p = _parser(dsub, "data synth", "write a synthetic dataset in the official ISIC 2018 training layout")
    p.add_argument("out", type=Path, help="folder to write (reused when it holds the same set)")
    p.add_argument("--n", type=int, default=600, help="number of images")
    p.add_argument("--seed", type=int, default=0, help="random seed of the set")
    p = _parser(dsub, "data download", "download the official ISIC 2018 Task 3 archives")
    p.add_argument("dataset", choices=["isic2018"], help="which dataset")
    p.add_argument("--out", type=Path, required=True, help="folder for the archives and the extracted data")
    p.add_argument("--parts", nargs="*", default=None, help="subset of archives (default: all)")
    p.add_argument("--base-url", default=None, help="mirror serving the official file names "
                   "(default: the ISIC challenge's own host)")

    p = _parser(sub, "pretrain", "SimCLR pretraining: one MLflow run (resumes an unfinished run of the same config)")
    _config_args(p)
    p = _parser(sub, "finetune", "fine-tune or linear-probe a classifier from scratch, ImageNet or a SimCLR run")
    _config_args(p)

    p = _parser(sub, "evaluate", "metrics of a model on a labelled folder, logged to MLflow")
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, runs:/RUN_ID/model or a path (required)")
    p.add_argument("--data", required=True, type=Path, help="labelled folder in the official layout, unseen by the "
                   "model for test numbers (required)")
    p.add_argument("--json", type=Path, default=None, help="also write the metrics here (default: none)")
    p.add_argument("--experiment", default="skinclr-evaluate", help="MLflow experiment of the evaluation run")
    p = _parser(sub, "predict", "class probabilities for images")
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, runs:/RUN_ID/model or a path (required)")
    p.add_argument("images", nargs="+", type=Path, help="image files (JPEG or PNG)")
    p.add_argument("--out", type=Path, default=None, help="CSV file for the probabilities (default: print only)")

    p = _parser(sub, "sweep", "a Ray Tune sweep (ASHA + Optuna): one MLflow parent run, one child run per trial")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue a sweep whose driver stopped")
    p = _parser(sub, "promote", "register the best run's model; move alias champion only if it is better")
    p.add_argument("--experiment", default="skinclr-finetune", help="experiment whose finished runs compete")
    p.add_argument("--metric", default="val_balanced_accuracy", help="what decides (a loss is minimised)")
    p.add_argument("--name", default="skinclr", help="registered model name")
    p.add_argument("--run", default=None, help="promote this run instead of the best one (default: the best run)")
    p.add_argument("--split", default=None, metavar="FINGERPRINT", help="rank only runs validated on this "
                   "split_fingerprint (default: the champion's split)")
    p.add_argument("--force", action="store_true", help="move the alias even if not better")
    p.add_argument("--rollback", action="store_true", help="swap champion and previous back")
    p = _parser(sub, "report", "rebuild the paper's tables and figures from MLflow runs")
    p.add_argument("--experiment", action="append", default=None, help="experiment(s) to read (repeatable; "
                   "default: skinclr-finetune)")
    p.add_argument("--out", type=Path, default=Path("reports"), help="folder for report.md, tables and figures")
    p.add_argument("--study", default=None, metavar="RUN",
                   help="the grid study (parent run id or name) for the label-efficiency section "
                        "(default: the newest study over data.label_fraction in the experiments)")
    p = _parser(sub, "quickstart", "synthetic data, a small sweep, fine-tune, evaluate, promote: minutes on a CPU")
    p.add_argument("--workdir", type=Path, default=Path("quickstart"), help="folder for its data and Ray files")
    p = _parser(sub, "gc", "delete the resume checkpoints of runs that ended (their models and backbones stay "
                "in MLflow)")
    p.add_argument("--unfinished", action="store_true", help="also those of KILLED and FAILED runs, which then "
                   "restart from epoch 1 instead of resuming")
    p.add_argument("--dry-run", action="store_true", help="only list what would be deleted")
    p = _parser(sub, "server", "an MLflow tracking server (UI + REST) over the project's store")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=5000)
    p.add_argument("--backend-store-uri", default=None)
    p.add_argument("--artifacts-destination", default=None)
    return parser


def cmd_data(args) -> int:
    from core import data

    if args.data_command == "check":
        manifest, problems, warnings = data.check_folder(args.dir, workers=args.workers)
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        if problems:
            for p in problems:
                print(f"error: {p}", file=sys.stderr)
            print(f"{args.dir}: {len(problems)} problem(s); fix them and run `skinclr data check` again",
                  file=sys.stderr)
            return 1
        print(data.summary_table(manifest))
        return 0
    if args.data_command == "synth":
        from core.synth import make_synthetic

        out = make_synthetic(args.out, n=args.n, seed=args.seed)
        print(f"synthetic dataset ({args.n} images, seed {args.seed}) in {out}")
        return 0
    from core.download import download_isic2018

    download_isic2018(args.out, parts=args.parts, base_url=args.base_url)
    return 0


def _load_config(args, stage: str | None):
    """The resolved config, validated before any heavy import, and the store checked after it."""
    from core.config import ConfigError
    from experiments.sweep_config import load_run_config  # a run config with its sweep section

    cfg = load_run_config(args.config, args.overrides, stage=stage)
    root = cfg.data.root
    if root and not Path(root).expanduser().is_dir():
        what = "is a file, not a folder" if Path(root).expanduser().exists() else "does not exist"
        raise ConfigError(f"config key 'data.root': {root} {what}; set it to a dataset folder in the official "
                          "ISIC 2018 layout (--set data.root=DIR)")
    _check_store()
    return cfg


def _check_store() -> str:
    from core.store import check_store

    return check_store()


def _writable(path: Path | None, flag: str, folder: bool = False) -> None:
    """Fail before the work if an output path cannot be written, naming the flag."""
    if path is None:
        return
    path = Path(path).expanduser()
    target = path if folder else path.parent
    if not folder and path.is_dir():
        raise UsageError(f"{flag} {path}: is a folder; give a file name, e.g. {path / 'out'}")
    try:
        target.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=target):
            pass
    except OSError as err:
        raise UsageError(f"{flag} {path}: cannot write in {target} ({err.strerror or err}); pass a writable path") \
            from None


def cmd_train(args) -> int:
    cfg = _load_config(args, args.command)
    _INTERRUPT["resumable"] = cfg.tracking.resume
    from core.runner import run_finetune, run_pretrain

    run = run_pretrain if args.command == "pretrain" else run_finetune
    result = run(cfg)
    shown = {k: round(v, 4) for k, v in result.last.items() if not k.endswith("seconds")}
    print(f"{args.command} run {result.run_id} {result.status} after {result.epochs} epochs: {shown}")
    print(f"experiment '{cfg.experiment}' in {_store()}")
    _show("the run", run=result.run_id)
    return 0


def cmd_evaluate(args) -> int:
    _writable(args.json, "--json")
    _check_store()
    from core.evaluate import evaluate, format_summary

    result = evaluate(args.model, args.data, json_out=args.json, experiment=args.experiment)
    for line in result["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    print(format_summary(result))
    _show("the evaluation", run=result["run_id"])
    return 0


def cmd_predict(args) -> int:
    _writable(args.out, "--out")
    if args.model.startswith(("models:/", "runs:/")):
        _check_store()
    from core.evaluate import predict

    frame = predict(args.model, [str(p) for p in args.images], out_csv=args.out)
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"))
    failed = [error for error in frame["error"] if isinstance(error, str)] if "error" in frame.columns else []
    for error in failed:
        print(f"error: {error}", file=sys.stderr)
    if len(failed):
        print(f"{len(failed)} of {len(frame)} images could not be read; the others were predicted"
              + (f" and written to {args.out}" if args.out else ""), file=sys.stderr)
        return 1
    return 0


def cmd_sweep(args) -> int:
    _load_config(args, None)
    from experiments.sweep import main as sweep_main

    return sweep_main(args.config, args.overrides, resume=args.resume)


def cmd_promote(args) -> int:
    _check_store()
    from core.registry import promote, rollback

    if args.rollback:
        print(rollback(args.name))
    else:
        print(promote(args.experiment, metric=args.metric, name=args.name, run_id=args.run, force=args.force,
                      split=args.split))
    _show(f"{args.name}@champion", champion=args.name)
    return 0


def cmd_report(args) -> int:
    _writable(args.out, "--out", folder=True)
    _check_store()
    from core.report import build_report

    out = build_report(args.experiment or ["skinclr-finetune"], args.out, study=args.study)
    print(f"report written to {out}")
    return 0


def cmd_quickstart(args) -> int:
    _writable(args.workdir, "--workdir", folder=True)
    _check_store()
    from experiments.quickstart import quickstart

    return quickstart(args.workdir)


def cmd_gc(args) -> int:
    _check_store()
    from core.gc import collect

    print(collect(unfinished=args.unfinished, dry_run=args.dry_run))
    return 0


def cmd_server(args) -> int:
    from core.server import serve

    return serve(args.host, args.port, args.backend_store_uri, args.artifacts_destination)


def _show(what: str, run: str | None = None, champion: str | None = None) -> None:
    """One line with a link into the MLflow UI, opening in its model-training view."""
    from core import links, tracking

    if champion is not None:
        from core.registry import CHAMPION, alias_version

        version = alias_version(tracking.client(), champion, CHAMPION)
        link = links.model_link(champion, version.version if version else None)
    else:
        link = links.run_link(run)
    print(f"open {what} in the MLflow UI{links.browse_hint()}: {link}")


def _store() -> str:
    from core.store import tracking_uri

    return tracking_uri()


HANDLERS = {"data": cmd_data, "pretrain": cmd_train, "finetune": cmd_train, "evaluate": cmd_evaluate,
            "predict": cmd_predict, "sweep": cmd_sweep, "promote": cmd_promote, "report": cmd_report,
            "quickstart": cmd_quickstart, "server": cmd_server, "gc": cmd_gc}
_INTERRUPT = {"signal": signal.SIGINT, "resumable": True}  # what the Ctrl-C line may promise


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean 'the input is wrong', printed as one line instead of a traceback.

    Only modules already imported are looked at: an error cannot come from one that is not."""
    errors: list[type[BaseException]] = [FileNotFoundError, UsageError]
    for module, name in (("core.config", "ConfigError"), ("core.problems", "DataError"), ("core.models", "ModelError"),
                         ("core.store", "StoreError"), ("core.filelock", "BusyError"),
                         ("core.model_uri", "ModelNotFound"), ("core.candidates", "PromotionError"), ("core.report", "ReportError"),
                         ("core.archives", "DownloadError")):
        if module in sys.modules and hasattr(sys.modules[module], name):
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def _terminate(signum, frame) -> None:
    """SIGTERM does what Ctrl-C does (Ray Tune's own handler, where one is installed, included)."""
    _INTERRUPT["signal"] = signal.SIGTERM
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        raise KeyboardInterrupt


def _interrupted(command: str) -> str:
    tracking = sys.modules.get("core.tracking")
    killed = list(tracking.killed_runs) if tracking else []
    name = "terminated" if _INTERRUPT["signal"] == signal.SIGTERM else "interrupted"
    if command == "sweep" and tracking and tracking.opened_runs:
        return f"{name}; continue the sweep with the same command and --resume"
    if killed and _INTERRUPT["resumable"]:
        return (f"{name}; run {', '.join(killed)} is marked KILLED and resumes from its last finished epoch when "
                "the same command runs again")
    if killed:
        return f"{name}; run {', '.join(killed)} is marked KILLED (tracking.resume is off: a new run starts next time)"
    return f"{name} before any run was opened; nothing to resume"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    own_sigterm = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    if own_sigterm:
        signal.signal(signal.SIGTERM, _terminate)
    try:
        return HANDLERS[args.command](args)
    except KeyboardInterrupt:
        print(_interrupted(args.command), file=sys.stderr)
        return 128 + int(_INTERRUPT["signal"])
    except Exception as err:  # noqa: BLE001 - narrowed just below
        if isinstance(err, expected_errors()):
            for line in getattr(err, "problems", None) or str(err).splitlines() or [repr(err)]:
                print(f"error: {line}", file=sys.stderr)
            return 1
        raise
    finally:
        if own_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


if __name__ == "__main__":
    sys.exit(main())
