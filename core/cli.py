"""`skinclr ...`: parse, call the library, print. No logic lives here.

Every expected failure (bad data, config, model URI) is one clear line on stderr and exit 1;
heavy libraries load only inside the subcommand that needs them, so `--help` is instant.
"""
from __future__ import annotations

import argparse
import os
import sys
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
}


def _parser(sub, name: str, help: str, **kw) -> argparse.ArgumentParser:
    return sub.add_parser(name.split()[-1], help=help, description=help, epilog=f"example:\n  {EXAMPLES[name]}",
                          formatter_class=argparse.RawDescriptionHelpFormatter, **kw)


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", type=Path, help="YAML config (see experiments/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set train.epochs=5 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="skinclr", description="SimCLR pretraining and fine-tuning for "
                                     "ISIC 2018 Task 3, tracked in MLflow, swept with Ray Tune.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    data = sub.add_parser("data", help="check, synthesize or download datasets")
    dsub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    p = _parser(dsub, "data check", "validate a dataset folder (decodes every image) and summarise it")
    p.add_argument("dir", type=Path)
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    p = _parser(dsub, "data synth", "write a synthetic dataset in the official ISIC 2018 training layout")
    p.add_argument("out", type=Path)
    p.add_argument("--n", type=int, default=600, help="number of images")
    p.add_argument("--seed", type=int, default=0)
    p = _parser(dsub, "data download", "download the official ISIC 2018 Task 3 archives")
    p.add_argument("dataset", choices=["isic2018"])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--parts", nargs="*", default=None, help="subset of archives (default: all)")
    p.add_argument("--base-url", default=None, help="mirror serving the official file names")

    p = _parser(sub, "pretrain", "SimCLR pretraining: one MLflow run (resumes an unfinished run of the same config)")
    _config_args(p)
    p = _parser(sub, "finetune", "fine-tune or linear-probe a classifier from scratch, ImageNet or a SimCLR run")
    _config_args(p)

    p = _parser(sub, "evaluate", "metrics of a model on a labelled folder, logged to MLflow")
    p.add_argument("--model", required=True, help="models:/NAME@ALIAS, runs:/RUN_ID/model or a path")
    p.add_argument("--data", required=True, type=Path, help="labelled folder in the official layout")
    p.add_argument("--json", type=Path, default=None, help="also write the metrics here")
    p.add_argument("--experiment", default="skinclr-evaluate")
    p = _parser(sub, "predict", "class probabilities for images")
    p.add_argument("--model", required=True)
    p.add_argument("images", nargs="+", type=Path)
    p.add_argument("--out", type=Path, default=None, help="CSV file for the probabilities")

    p = _parser(sub, "sweep", "a Ray Tune sweep (ASHA + Optuna): one MLflow parent run, one child run per trial")
    _config_args(p)
    p.add_argument("--resume", action="store_true", help="continue a sweep whose driver stopped")
    p = _parser(sub, "promote", "register the best run's model; move alias champion only if it is better")
    p.add_argument("--experiment", default="skinclr-finetune")
    p.add_argument("--metric", default="val_balanced_accuracy")
    p.add_argument("--name", default="skinclr", help="registered model name")
    p.add_argument("--run", default=None, help="promote this run instead of the best one")
    p.add_argument("--force", action="store_true", help="move the alias even if not better")
    p.add_argument("--rollback", action="store_true", help="swap champion and previous back")
    p = _parser(sub, "report", "rebuild the paper's tables and figures from MLflow runs")
    p.add_argument("--experiment", action="append", default=None, help="experiment(s) to read (repeatable)")
    p.add_argument("--out", type=Path, default=Path("reports"))
    p = _parser(sub, "quickstart", "synthetic data, a small sweep, fine-tune, evaluate, promote: minutes on a CPU")
    p.add_argument("--workdir", type=Path, default=Path("quickstart"))
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


def cmd_train(args) -> int:
    from core.config import load_config
    from core.runner import run_finetune, run_pretrain

    cfg = load_config(args.config, args.overrides, stage=args.command)
    run = run_pretrain if args.command == "pretrain" else run_finetune
    result = run(cfg)
    shown = {k: round(v, 4) for k, v in result.last.items() if not k.endswith("seconds")}
    print(f"{args.command} run {result.run_id} {result.status} after {result.epochs} epochs: {shown}")
    print(f"experiment '{cfg.experiment}' in {_store()}")
    return 0


def cmd_evaluate(args) -> int:
    from core.evaluate import evaluate, format_summary

    print(format_summary(evaluate(args.model, args.data, json_out=args.json, experiment=args.experiment)))
    return 0


def cmd_predict(args) -> int:
    from core.evaluate import predict

    frame = predict(args.model, [str(p) for p in args.images], out_csv=args.out)
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    return 0


def cmd_sweep(args) -> int:
    from experiments.sweep import main as sweep_main

    return sweep_main(args.config, args.overrides, resume=args.resume)


def cmd_promote(args) -> int:
    from core.registry import promote, rollback

    if args.rollback:
        print(rollback(args.name))
    else:
        print(promote(args.experiment, metric=args.metric, name=args.name, run_id=args.run, force=args.force))
    return 0


def cmd_report(args) -> int:
    from core.report import build_report

    out = build_report(args.experiment or ["skinclr-finetune"], args.out)
    print(f"report written to {out}")
    return 0


def cmd_quickstart(args) -> int:
    from experiments.quickstart import quickstart

    return quickstart(args.workdir)


def cmd_server(args) -> int:
    from core.server import serve

    return serve(args.host, args.port, args.backend_store_uri, args.artifacts_destination)


def _store() -> str:
    from core.tracking import tracking_uri

    return tracking_uri()


HANDLERS = {"data": cmd_data, "pretrain": cmd_train, "finetune": cmd_train, "evaluate": cmd_evaluate,
            "predict": cmd_predict, "sweep": cmd_sweep, "promote": cmd_promote, "report": cmd_report,
            "quickstart": cmd_quickstart, "server": cmd_server}


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean 'the input is wrong', printed as one line instead of a traceback.

    Only modules already imported are looked at: an error cannot come from one that is not."""
    errors: list[type[BaseException]] = [FileNotFoundError]
    for module, name in (("core.config", "ConfigError"), ("core.data", "DataError"), ("core.models", "ModelError"),
                         ("core.serving", "ModelNotFound"), ("core.registry", "PromotionError"), ("core.report", "ReportError"),
                         ("core.download", "DownloadError")):
        if module in sys.modules and hasattr(sys.modules[module], name):
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return HANDLERS[args.command](args)
    except KeyboardInterrupt:
        print("interrupted; an unfinished run resumes when the same command runs again", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - narrowed just below
        if isinstance(err, expected_errors()):
            for line in getattr(err, "problems", None) or str(err).splitlines() or [repr(err)]:
                print(f"error: {line}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
