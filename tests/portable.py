"""Losses that are the same on every x86 machine, for tests that pin a loop's numbers.

A few Adam steps amplify the last bits that differ between kernels (AVX2 or AVX-512 in ATen and
oneDNN, MKL's per-CPU code paths) into the third decimal, so a value recorded on one machine does
not hold on another. A child process with every library held to its portable code path brings
the spread down to the fourth decimal: the values recorded on an AMD EPYC came out within 5e-4
(relative) on an Intel Xeon with AVX-512, from the same code. `LOSS_REL` allows that spread and
no more; a changed loop (another augmentation, lr or seed) moves them by 1e-2 or more.

OpenCV is not held by those switches (its own dispatch moves the numbers): on a CPU without AVX-512
(an AMD EPYC with AVX2) a fine-tune's losses come out 0.2-1% from the AVX-512 machines', the same
code on the same images, while SimCLR's pin, whose views are not rotated, holds on both. So the
fine-tune's pin records one set per `simd()` class.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOSS_REL = 2e-3  # the cross-CPU spread measured above, with room; a changed loop moves the losses more
PORTABLE = {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41", "MKL_CBWR": "COMPATIBLE"}

CHILD = """
import json
from skinclr.config import load_config
from skinclr.data.inputs import resolve_inputs
from {module} import {stage} as loop
cfg = load_config({config!r}, {sets!r}, stage={stage!r})
records = loop(cfg, resolve_inputs(cfg, progress=False))
print(json.dumps([[r.metrics[k] for k in {keys!r}] for r in records]))
"""


def simd() -> str:
    """`avx512` or `avx2`: the widest vector unit every library here dispatches to on this CPU."""
    from skinclr.runtime import cpu_info

    return "avx512" if "avx512f" in cpu_info().get("flags", "").split() else "avx2"


def portable_losses(config: Path, stage: str, overrides: list[str], keys: list[str], store: Path) -> list[float]:
    """The loop of `stage` run on `config` with `overrides`: the `keys` of each epoch's record, flattened."""
    module = {"pretrain": "skinclr.train.methods", "finetune": "skinclr.train.finetune"}[stage]
    code = CHILD.format(module=module, stage=stage, config=str(config), sets=overrides, keys=keys)
    env = {**os.environ, **PORTABLE, "MLFLOW_TRACKING_URI": f"sqlite:///{store}", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [v for epoch in json.loads(done.stdout.strip().splitlines()[-1]) for v in epoch]
