"""What makes a run resumable exactly and safely: devices checked up front, every RNG saved and
restored through a weights-only checkpoint, files that are whole or absent, interrupts that wait
for a write, and the digest that tells an image as the model saw it."""
from __future__ import annotations

import io
import os
import pickle
import random
import signal

import numpy as np
import pytest
import torch

from skinclr.config import ConfigError, load_config
from skinclr.runtime import (check_devices, describe_device, interrupts_deferred, load_checkpoint, pick_device,
                             rng_state, save_atomic, seed_everything, set_rng_state)


def draws() -> tuple:
    return torch.rand(3).tolist(), np.random.rand(3).tolist(), [random.random() for _ in range(3)]


def test_every_rng_comes_back_through_a_weights_only_checkpoint():
    seed_everything(5)
    draws()
    saved = io.BytesIO()
    torch.save(rng_state(), saved)  # as the runner saves it after an epoch
    expected = draws()
    draws()  # the process goes on (or dies) ...
    saved.seek(0)
    set_rng_state(torch.load(saved, weights_only=True))  # ... and a resumed one restores it
    assert draws() == expected


def test_the_same_seed_draws_the_same_numbers():
    seed_everything(11)
    first = draws()
    seed_everything(11)
    assert draws() == first
    seed_everything(12)
    assert draws() != first


def test_a_checkpoint_file_is_whole_or_absent_and_loads_only_tensors(tmp_path):
    path = save_atomic({"epoch": 3, "w": torch.arange(4)}, tmp_path / "run" / "checkpoint.pt")
    assert path.is_file() and os.listdir(path.parent) == ["checkpoint.pt"]  # no temporary name left behind
    loaded = load_checkpoint(path)
    assert loaded["epoch"] == 3 and torch.equal(loaded["w"], torch.arange(4))
    save_atomic({"epoch": 4}, path)  # replaced by rename: a reader sees the old file or the new one
    assert load_checkpoint(path) == {"epoch": 4}
    torch.save({"epoch": 5, "code": Unsafe()}, tmp_path / "unsafe.pt")
    with pytest.raises(pickle.UnpicklingError):
        load_checkpoint(tmp_path / "unsafe.pt")


class Unsafe:
    """An arbitrary object: a checkpoint holding one is refused, never unpickled."""


def test_an_interrupt_during_a_write_takes_effect_once_the_write_ends():
    events = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            os.kill(os.getpid(), signal.SIGINT)
            events.append("write finished")
        events.append("not reached")
    assert events == ["write finished"]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers are back


@pytest.mark.parametrize("info, said", [
    ({"model name": "AMD EPYC", "flags": "fpu sse2 avx avx2 fma"}, "cpu AMD EPYC (AVX2)"),
    ({"model name": "Intel(R) Xeon(R) Platinum 8488C", "flags": "avx2 avx512f avx512_bf16 amx_bf16 amx_tile"},
     "cpu Intel(R) Xeon(R) Platinum 8488C (AVX-512, AMX)"),
    ({}, "cpu"),
])
def test_a_cpu_run_names_the_cpu_and_its_vector_units(monkeypatch, info, said):
    """Two machines of one kind trained at twice each other's speed by these units (AVX2 against
    AVX-512 and AMX): a run's device tag says which it had."""
    from skinclr import runtime

    monkeypatch.setattr(runtime, "cpu_info", lambda: info)
    assert describe_device(torch.device("cpu")) == said
    assert runtime.cpu_bf16_units() == (None if not info else "amx_bf16" in info["flags"])


def test_devices_a_config_names_must_exist():
    assert pick_device("cpu") == torch.device("cpu")
    assert describe_device(torch.device("cpu")).startswith("cpu")
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible here")
    assert pick_device("auto") == torch.device("cpu")
    with pytest.raises(ConfigError, match="train.device=cuda but no CUDA device"):
        pick_device("cuda")
    with pytest.raises(ConfigError, match="augment.device=cuda"):
        check_devices(load_config(None, {"augment.device": "cuda"}))
    check_devices(load_config(None, {"train.device": "cpu", "augment.device": "auto"}))
