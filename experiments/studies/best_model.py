"""The best model skinclr makes from a dataset folder, as the platform's own commands:

    python experiments/studies/best_model.py --data DIR [--folds 5] [--tta d4] [--rule balanced] [--set k=v ...]

1. folds     the CPU recipe on each of k lesion-grouped folds of the non-test part
             (experiments/studies/folds.yaml: data.test_fraction holds a fifth out first)
2. ensemble  one model of the k fold models, TTA and a decision rule fitted on the out-of-fold
             predictions, scored once on the test side (`skinclr ensemble --parent`)
3. promote   registered; alias `champion` moves if it beats the champion on the same metric

Each step is resumable and a finished step is skipped, so after any interruption the same command
continues: the sweep with --resume, the ensemble found by its run name. Prints each step's wall time.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from skinclr import names
from skinclr.config import ConfigError
from skinclr.track import tracking
from skinclr.tune.plan import load_sweep_config, sweep_folder

REPO = Path(__file__).resolve().parents[2]
STUDY = REPO / "experiments" / "studies" / "folds.yaml"


def sh(cmd: list[str], dry: bool) -> float:
    """Run one step. A step that refused its input said why in one line: nothing is added to it.
    An interrupted one resumes when the same command runs again."""
    print("$", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    code = 0 if dry else subprocess.run(cmd, cwd=REPO).returncode
    if code == 1:
        sys.exit(1)
    if code >= 128:
        sys.exit("interrupted; run the same command again to continue (finished steps are skipped)")
    if code:
        sys.exit(f"step failed (exit {code}): {' '.join(cmd)}; run the same command again to continue")
    return time.perf_counter() - t0


def folds(text: str) -> int:
    try:
        k = int(text)
    except ValueError:
        k = 0
    if k < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: give the number of folds, 2 or more")
    return k


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="dataset folder in the official ISIC 2018 layout")
    ap.add_argument("--folds", type=folds, default=5, help="lesion-grouped folds of the non-test part (default: 5)")
    ap.add_argument("--tta", default="d4", choices=names.TTA_MODES)
    ap.add_argument("--rule", default="balanced", choices=names.DECISION_RULES)
    ap.add_argument("--set", dest="overrides", nargs="+", default=[], metavar="KEY=VALUE",
                    help="more overrides of the study's config (e.g. train.epochs=8)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = ap.parse_args()
    skinclr = [sys.executable, "-m", "skinclr.cli"]
    sets = [f"data.root={Path(args.data).resolve()}", f"data.folds={args.folds}",
            f"sweep.grid.data.fold=[{', '.join(map(str, range(args.folds)))}]", *args.overrides]
    if not Path(args.data).is_dir():
        sys.exit(f"error: --data {args.data}: no such folder; give the dataset folder in the official ISIC 2018 layout")
    try:
        cfg, _ = load_sweep_config(STUDY, sets)
    except ConfigError as err:
        sys.exit(f"error: {err}")
    folder = sweep_folder(cfg)
    times = {"folds": sh([*skinclr, "sweep", "--config", str(STUDY), "--set", *sets,
                          *(["--resume"] if folder.exists() else [])], args.dry_run)}
    if args.dry_run:
        print("$ skinclr ensemble --parent PARENT ...; skinclr promote --run ENSEMBLE ...")
        return
    c = tracking.client()
    exp = c.get_experiment_by_name(cfg.experiment)
    (parent,) = c.search_runs([exp.experiment_id], f"tags.`{names.SWEEP_FOLDER_TAG}` = '{folder}'", max_results=1)
    name = f"best model of {parent.info.run_id[:8]} ({args.tta}, rule {args.rule})"
    done = c.search_runs([exp.experiment_id], f"attributes.run_name = '{name}' and attributes.status = 'FINISHED'")
    if not done:
        times["ensemble"] = sh([*skinclr, "ensemble", "--parent", parent.info.run_id, "--tta", args.tta,
                                "--decision-rule", args.rule, "--name", name], False)
        done = c.search_runs([exp.experiment_id], f"attributes.run_name = '{name}' and attributes.status = 'FINISHED'")
    times["promote"] = sh([*skinclr, "promote", "--run", done[0].info.run_id, "--metric", "oof_balanced_accuracy"],
                          False)
    m = done[0].data.metrics
    print(f"best model: run {done[0].info.run_id}; test balanced accuracy {m.get('test_balanced_accuracy', float('nan')):.4f} "
          f"(without the rule {m.get('test_balanced_accuracy_without_rule', float('nan')):.4f}); out-of-fold "
          f"{m.get('oof_balanced_accuracy', float('nan')):.4f}; folds' val {m.get('folds_val_balanced_accuracy_mean', float('nan')):.4f}"
          f" +- {m.get('folds_val_balanced_accuracy_std', float('nan')):.4f}")
    print("wall time: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()))


if __name__ == "__main__":
    main()
