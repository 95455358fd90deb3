"""The paper's recipe at its own resolution on one GPU, without MLflow or Ray: the core loops only.

SimCLR pretraining (bf16 autocast, channels_last) on the real train split, then fine-tuning
from scratch and from the SimCLR backbone on the same lesion-grouped split; prints a table
and writes JSON. It checks the CUDA paths of the loops and measures what a GPU buys.

    python tests/benchmarks/bench_gpu_paper.py --data DIR [--size 224] [--pretrain-epochs 40]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402

from skinclr.config import load_config  # noqa: E402
from skinclr.train.finetune import finetune  # noqa: E402
from skinclr.data.inputs import resolve_inputs  # noqa: E402
from skinclr.train.methods import pretrain  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", type=Path, required=True)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--pretrain-epochs", type=int, default=40)
    ap.add_argument("--finetune-epochs", type=int, default=20)
    ap.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    ap.add_argument("--device", default="cuda", help="cpu: a smoke run of this script")
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "benchmarks" / "results" / "bench_gpu_paper.json")
    args = ap.parse_args()
    cuda = args.device == "cuda"
    assert torch.cuda.is_available() or not cuda, "this benchmark needs a CUDA GPU"
    common = [f"data.root={args.data}", f"data.image_size={args.size}", f"data.workers={args.workers}",
              f"train.device={args.device}"]
    result: dict = {"gpu": torch.cuda.get_device_name(0) if cuda else "cpu", "torch": torch.__version__,
                    "size": args.size}

    t0 = time.perf_counter()
    pre_cfg = load_config(REPO / "experiments/paper/simclr_pretrain.yaml",
                          common + [f"train.epochs={args.pretrain_epochs}", "monitor.every=5", "monitor.max_bank=0"])
    inputs = resolve_inputs(pre_cfg)
    result["cache_seconds"] = time.perf_counter() - t0
    curve, backbone = [], None
    for rec in pretrain(pre_cfg, inputs):
        m = rec.metrics
        curve.append({"epoch": rec.epoch, **m})
        knn = m.get("knn_balanced_accuracy")
        print(f"pretrain epoch {rec.epoch:3d} loss {m['train_loss']:.4f} {m['images_per_second']:7.0f} img/s"
              + (f" knn_bal_acc {knn:.4f} (monitor {m['monitor_seconds']:.1f}s)" if knn is not None else ""),
              flush=True)
        backbone = rec.state()["backbone"]
    ckpt = Path(os.environ.get("TMPDIR", "/tmp")) / "simclr_backbone.pt"
    torch.save(backbone, ckpt)
    result["pretrain"] = curve
    result["peak_memory_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else 0.0

    for init in ("scratch", "simclr"):
        ft_cfg = load_config(REPO / "experiments/paper/baseline_scratch.yaml",
                             common + [f"train.epochs={args.finetune_epochs}",
                                       f"finetune.init={ckpt if init == 'simclr' else 'scratch'}"], stage="finetune")
        history = []
        for rec in finetune(ft_cfg, inputs):
            m = rec.metrics
            history.append({"epoch": rec.epoch, **m})
            print(f"finetune[{init}] epoch {rec.epoch:2d} val_bal_acc {m['val_balanced_accuracy']:.4f} "
                  f"val_acc {m['val_accuracy']:.4f} val_loss {m['val_loss']:.4f} lr {m['lr']:.1e} "
                  f"{m['images_per_second']:6.0f} img/s", flush=True)
        best = max(history, key=lambda h: h["monitor_value"])
        result[f"finetune_{init}"] = {"history": history, "best_epoch": best["epoch"],
                                      "val_balanced_accuracy": best["val_balanced_accuracy"],
                                      "val_accuracy": best["val_accuracy"]}
    result["total_seconds"] = time.perf_counter() - t0

    print(f"\n{result['gpu']}, {args.size}px, SimCLR {args.pretrain_epochs} epochs "
          f"({curve[-1]['images_per_second']:.0f} img/s, peak {result['peak_memory_gib']:.1f} GiB)")
    print(f"{'init':<10}{'best epoch':>11}{'val bal acc':>13}{'val acc':>9}")
    for init in ("scratch", "simclr"):
        r = result[f"finetune_{init}"]
        print(f"{init:<10}{r['best_epoch']:>11}{r['val_balanced_accuracy']:>13.4f}{r['val_accuracy']:>9.4f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} in {result['total_seconds']:.0f} s")


if __name__ == "__main__":
    main()
