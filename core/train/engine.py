"""The one training engine: the epoch loop that pretraining and fine-tuning both run on.

A task says what differs: its modules and optimizer (`setup`), its batches, the loss of one
batch, what follows each optimizer step (momentum encoders, queues), its per-epoch evaluation
and its extra state. The engine owns the rest, once: device, threads, seed, resume, step cap,
timing, autocast and the per-epoch record. It knows nothing of MLflow or Ray: a driver logs
`record.metrics` and saves `record.state()`; passing that state back as `resume=` continues
the run exactly where it stopped.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from skinclr import names
from skinclr.config import ConfigError, TrainConfig
from skinclr.runtime import cpu_bf16_units, pick_device, rng_state, seed_everything, set_rng_state, set_threads


@dataclass
class EpochRecord:
    epoch: int  # 1-based
    metrics: dict[str, float]
    state: Callable[[], dict[str, Any]]  # full training state, for checkpoints and resuming
    is_best: bool = False  # the monitored metric improved this epoch
    stop: bool = False  # the loop ends after this record (early stopping)
    report: dict | None = None  # fine-tuning: this epoch's val classification report (figures, tables)
    history: list[dict] = field(default_factory=list)  # fine-tuning: every epoch's metrics so far (curves)
    best_model: dict | None = None  # fine-tuning: state_dict of the best epoch so far (the logged model)


class Task:
    """What one kind of training supplies to the engine; the engine calls these in this order."""

    model: nn.Module  # every trained or momentum-updated module and buffer: the checkpoint's "model"
    world: int = 1  # processes sharing one global batch (images/s counts them all)

    def setup(self, device: torch.device, resume: dict | None) -> torch.optim.Optimizer:
        """Build `model` on `device` (after seeding) and return its optimizer. `resume` is the
        saved state or None; the engine itself restores model, optimizer and RNG afterwards."""
        raise NotImplementedError

    def batches(self, epoch: int) -> Iterable:
        raise NotImplementedError

    def loss(self, batch) -> tuple[Tensor, int]:
        """The batch's loss (runs under autocast) and how many images it holds."""
        raise NotImplementedError

    def after_step(self) -> None:
        """After each optimizer step: momentum encoders, queues."""

    def evaluate(self, epoch: int, metrics: dict[str, float]) -> dict[str, Any]:
        """Add this epoch's evaluation to `metrics`; return EpochRecord fields (is_best, stop, ...)."""
        return {}

    def state(self) -> dict[str, Any]:
        """Extra checkpoint entries beside epoch, model, optimizer and rng."""
        return {}


def run(task: Task, train: TrainConfig, resume: dict[str, Any] | None = None,
        progress: bool = False, image_size: int | None = None) -> Iterator[EpochRecord]:
    device = pick_device(train.device)
    precision = step_precision(device, train.precision, image_size)
    warn_slow_bf16(device, precision)
    set_threads(train.threads)
    seed_everything(train.seed)
    optimizer = task.setup(device, resume)
    start = 1
    if resume is not None:
        task.model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        set_rng_state(resume["rng"])
        start = resume["epoch"] + 1

    for epoch in range(start, train.epochs + 1):
        task.model.train()
        t0, seen = time.perf_counter(), 0
        total = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no sync per step
        for step, batch in enumerate(steps(task.batches(epoch), epoch, progress)):
            if train.max_steps_per_epoch and step >= train.max_steps_per_epoch:
                break
            with autocast(device, precision):
                loss, n = task.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            task.after_step()
            total += loss.detach() * n
            seen += n
        if seen == 0:  # a run that trains nothing must fail, never finish as if it had trained
            raise ConfigError(f"epoch {epoch} made no optimizer step: no batch of train.batch_size="
                              f"{train.batch_size} was complete (the last incomplete batch is dropped); "
                              "lower train.batch_size")
        train_loss = total.item() / max(seen, 1)  # waits for the device to finish the epoch's steps
        train_seconds = time.perf_counter() - t0
        metrics = {"train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
                   "images_per_second": seen * task.world / train_seconds}
        fields = task.evaluate(epoch, metrics)
        metrics["epoch_seconds"] = time.perf_counter() - t0

        def state(epoch=epoch) -> dict[str, Any]:
            return {"epoch": epoch, "model": task.model.state_dict(), "optimizer": optimizer.state_dict(),
                    "rng": rng_state(), **task.state()}

        record = EpochRecord(epoch, metrics, state, **fields)
        yield record
        if record.stop:
            return


def adam(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Adam:
    """Adam fused into one kernel per step (on CPU too: a ResNet-18 step at 32 px, 2 threads, 94 ->
    73 ms). Its numbers differ from the per-tensor loop's by rounding only (losses 1e-4 apart)."""
    return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, fused=True)


def compiled(module: nn.Module, enabled: bool) -> nn.Module:
    """`torch.compile` of the training forward when `train.compile` asks for it (the saved model stays the plain one)."""
    return torch.compile(module) if enabled else module


def step_precision(device: torch.device, precision: str = "auto", image_size: int | None = None) -> str:
    """`train.precision` as the training step runs it: fp32 or bf16. `auto` takes the faster of the
    two where it was measured (tests/benchmarks/bench_precision.py, a ResNet-18 fine-tune step on 2
    threads): bf16 on CUDA, and on a CPU with bf16 units (AMX) from 64 px (1.5x at 64 px, 2.4x at
    128 px; 0.88x at 32 px on one thread); fp32 on any other CPU, where bf16 is emulated (an AMD EPYC
    without those units: 11x slower at 64 px, 17x at 128 px). An unknown size counts as small."""
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16"
    if device.type == "cpu" and (image_size or 0) >= 64 and cpu_bf16_units():
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str = "auto"):
    """The step's autocast (`step_precision`); inference takes the default: bf16 on CUDA only.
    The weights, the optimizer and the losses stay float32."""
    if step_precision(device, precision) == "bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def warn_slow_bf16(device: torch.device, precision: str) -> None:
    if precision == "bf16" and device.type == "cpu" and cpu_bf16_units() is False:
        print("warning: train.precision=bf16 on a CPU without bf16 units (AMX, AVX-512 BF16) trains 11-17x "
              "slower than fp32 (measured at 64-128 px); set train.precision=auto", file=sys.stderr)


def to_device(x: Tensor, device: torch.device) -> Tensor:
    """Images onto the training device in channels_last, the layout cuDNN and oneDNN run fastest."""
    return x.to(device, non_blocking=True, memory_format=torch.channels_last)


def steps(loader: Iterable, epoch: int, progress: bool):
    """The batches, with a transient per-epoch step bar when asked for."""
    return tqdm(loader, desc=f"epoch {epoch}", unit="step", leave=False, disable=not progress)


TTA_VIEWS = dict(zip(names.TTA_MODES, (1, 4, 8)))  # test-time augmentation: views averaged per image


def views(x: Tensor, tta: str = "none") -> list[Tensor]:
    """The test-time views of a batch of squares (N, C, H, W). A dermoscopy image has no up:
    `flip` adds its mirror images and half turn (4 views), `d4` every rotation and flip of the
    square (8)."""
    if tta == "none":
        return [x]
    flips = [x, x.flip(3), x.flip(2), x.flip(2, 3)]
    if tta == "flip":
        return flips
    t = x.transpose(2, 3)
    return flips + [t, t.flip(3), t.flip(2), t.flip(2, 3)]


@torch.no_grad()
def infer(model: nn.Module, batches: Iterable, device: torch.device, tta: str = "none") -> Tensor:
    """`model`'s outputs over batches of images (or (images, labels) pairs), in eval mode and
    under the default autocast (bf16 on CUDA, float32 on the CPU): the one inference path of the kNN
    monitor, validation and serving, so all three see a model the same way. With `tta`, the
    output is the log of the class probabilities averaged over the views (so softmax of it is
    that average, and cross-entropy scores it)."""
    was_training = model.training
    model.eval()
    outputs = []
    try:
        for batch in batches:
            x = to_device(batch[0] if isinstance(batch, (tuple, list)) else batch, device)
            with autocast(device):
                if tta == "none":
                    outputs.append(model(x).float().cpu())
                else:
                    probs = torch.stack([model(v).float().softmax(1) for v in views(x, tta)]).mean(0)
                    outputs.append(probs.log().cpu())
    finally:
        model.train(was_training)
    return torch.cat(outputs)
