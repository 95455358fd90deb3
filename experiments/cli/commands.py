"""The `skinclr` subcommands: each loads its inputs, checks the store, calls one library
function and prints what it made. Heavy libraries load inside the command that needs them."""
from __future__ import annotations

import shlex
import signal
import sys
import tempfile
from pathlib import Path


class UsageError(ValueError):
    """A command-line value that cannot work (an output path that cannot be written)."""


INTERRUPT = {"signal": signal.SIGINT, "resumable": True}  # what the Ctrl-C line may promise


def cmd_data(args) -> int:
    from skinclr.data.manifest import check_folder, summary_table

    if args.data_command == "check":
        manifest, problems, warnings = check_folder(args.dir, workers=args.workers)
        for w in warnings:
            print(f"warning: {w}", file=sys.stderr)
        if problems:
            for p in problems:
                print(f"error: {p}", file=sys.stderr)
            print(f"{args.dir}: {len(problems)} problem(s); fix them and run `skinclr data check` again",
                  file=sys.stderr)
            return 1
        print(summary_table(manifest))
        return 0
    if args.data_command == "synth":
        from skinclr.data.synth import make_synthetic

        out = make_synthetic(args.out, n=args.n, seed=args.seed)
        print(f"synthetic dataset ({args.n} images, seed {args.seed}) in {out}")
        return 0
    from skinclr.data.download import download_isic2018

    download_isic2018(args.out, parts=args.parts, base_url=args.base_url)
    return 0


def _command(args) -> str:
    """The command line that made a run, tagged on it (names.COMMAND_TAG): it reproduces the run."""
    return shlex.join(["skinclr", *args.argv])


def _tag_command(run_id: str, args) -> None:
    """Tag a run a library call made with the command line that made it."""
    from skinclr import names
    from skinclr.track.tracking import RunLogger

    RunLogger(run_id).set_tags({names.COMMAND_TAG: _command(args)})


def _load_config(args, stage: str | None):
    """The resolved config, validated before any heavy import, and the store checked after it."""
    from skinclr.config import ConfigError
    from skinclr.tune.plan import load_run_config  # a run config with its sweep section

    cfg = load_run_config(args.config, args.overrides, stage=stage)
    root = cfg.data.root
    if root and not Path(root).expanduser().is_dir():
        what = "is a file, not a folder" if Path(root).expanduser().exists() else "does not exist"
        raise ConfigError(f"config key 'data.root': {root} {what}; set it to a dataset folder in the official "
                          "ISIC 2018 layout (--set data.root=DIR)")
    _check_store()
    return cfg


def _check_store() -> str:
    from skinclr.track.store import check_store

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
    INTERRUPT["resumable"] = cfg.tracking.resume
    from skinclr import names
    from skinclr.run.runner import run_finetune, run_pretrain

    run = run_pretrain if args.command == "pretrain" else run_finetune
    result = run(cfg, tags={names.COMMAND_TAG: _command(args)})
    shown = {k: round(v, 4) for k, v in result.last.items() if not k.endswith("seconds")}
    print(f"{args.command} run {result.run_id} {result.status} after {result.epochs} epochs: {shown}")
    print(f"experiment '{cfg.experiment}' in {_store()}")
    _show("the run", run=result.run_id)
    return 0


def cmd_evaluate(args) -> int:
    _writable(args.json, "--json")
    _check_store()
    from skinclr.serve.uris import locate_model

    locate_model(args.model)  # a wrong URI answers before torch loads
    from skinclr.report.evaluate import evaluate, format_summary

    result = evaluate(args.model, args.data, json_out=args.json, experiment=args.experiment, tta=args.tta)
    _tag_command(result["run_id"], args)
    for line in result["warnings"]:
        print(f"warning: {line}", file=sys.stderr)
    print(format_summary(result))
    _show("the evaluation", run=result["run_id"])
    return 0


def cmd_predict(args) -> int:
    _writable(args.out, "--out")
    from skinclr.data.images import image_files

    images = image_files([str(p) for p in args.images])
    if args.format == "isic":
        from skinclr.report.evaluate import isic_ids

        isic_ids(images)  # before the model loads
    if args.model.startswith(("models:/", "runs:/")):
        _check_store()
    from skinclr.serve.uris import locate_model

    locate_model(args.model)  # a wrong URI answers before torch loads
    from skinclr.report.evaluate import predict

    frame = predict(args.model, images, out_csv=args.out, fmt=args.format, tta=args.tta)
    print(frame.to_string(index=False, float_format=lambda v: f"{v:.4f}", na_rep="-"))
    failed = [error for error in frame["error"] if isinstance(error, str)] if "error" in frame.columns else []
    for error in failed:
        print(f"error: {error}", file=sys.stderr)
    if len(failed) and args.format == "isic":
        print(f"{len(failed)} of {len(frame)} images could not be read; an ISIC submission needs every image, so "
              f"{args.out or 'no file'} was not written: fix or drop those images and predict again", file=sys.stderr)
        return 1
    if len(failed):
        print(f"{len(failed)} of {len(frame)} images could not be read; the others were predicted"
              + (f" and written to {args.out}" if args.out else ""), file=sys.stderr)
        return 1
    return 0


def cmd_sweep(args) -> int:
    cfg = _load_config(args, None)  # the config's one load, validated before Ray or torch loads
    from skinclr.tune.plan import resolve_plan
    from skinclr.tune.sweep import run_plan

    return run_plan(resolve_plan(cfg, resume=args.resume, command=_command(args)))


def cmd_promote(args) -> int:
    _check_store()
    from skinclr.track.registry import promote, rollback

    if args.rollback:
        print(rollback(args.name))
    else:
        print(promote(args.experiment, metric=args.metric, name=args.name, run_id=args.run, force=args.force,
                      split=args.split))
    _show(f"{args.name}@champion", champion=args.name)
    return 0


def cmd_ensemble(args) -> int:
    _check_store()
    from skinclr.report.combine import build_ensemble, member_runs

    members = member_runs(args.runs, args.parent, args.top, args.experiment)
    result = build_ensemble(members, experiment=args.into, tta=args.tta or "none", rule=args.decision_rule,
                            run_name=args.name, data=args.data)
    _tag_command(result["run_id"], args)
    print(f"ensemble of {len(members)} runs: {', '.join(result['members'])}")
    for key, value in result["scores"].items():
        print(f"{key:<40} {value:.4f}")
    _show("the ensemble", run=result["run_id"])
    return 0


def cmd_report(args) -> int:
    _writable(args.out, "--out", folder=True)
    _check_store()
    from skinclr.report.paper import build_report

    out = build_report(args.experiment or ["skinclr-finetune"], args.out, study=args.study, command=_command(args))
    print(f"report written to {out}")
    return 0


def cmd_quickstart(args) -> int:
    _writable(args.workdir, "--workdir", folder=True)
    _check_store()
    from skinclr.cli.quickstart import quickstart

    return quickstart(args.workdir, command=_command(args))


def cmd_gc(args) -> int:
    _check_store()
    from skinclr.track.gc import collect

    print(collect(unfinished=args.unfinished, dry_run=args.dry_run))
    return 0


def cmd_server(args) -> int:
    from skinclr.track.server import serve

    return serve(args.host, args.port, args.backend_store_uri, args.artifacts_destination)


def _show(what: str, run: str | None = None, champion: str | None = None) -> None:
    """One line with a link into the MLflow UI, opening in its model-training view."""
    from skinclr.track import tracking

    if champion is not None:
        from skinclr.track.registry import CHAMPION, alias_version

        version = alias_version(tracking.client(), champion, CHAMPION)
        link = tracking.model_link(champion, version.version if version else None)
    else:
        link = tracking.run_link(run)
    print(f"open {what} in the MLflow UI{tracking.browse_hint()}: {link}")


def _store() -> str:
    from skinclr.track.store import tracking_uri

    return tracking_uri()


HANDLERS = {"data": cmd_data, "pretrain": cmd_train, "finetune": cmd_train, "evaluate": cmd_evaluate,
            "predict": cmd_predict, "sweep": cmd_sweep, "promote": cmd_promote, "ensemble": cmd_ensemble, "report": cmd_report,
            "quickstart": cmd_quickstart, "server": cmd_server, "gc": cmd_gc}
