"""How Tune picks and stops trials: the search algorithm and the scheduler of a sweep.

TPE (Optuna) or random sampling proposes trials and ASHA stops the weak ones at its rungs; a
grid study runs every combination of `sweep.grid` to its end.
"""
from __future__ import annotations

from experiments.sweep_config import SweepRunConfig


def search_algorithm(cfg: SweepRunConfig):
    """TPE (Optuna), random sampling or the full grid, seeded by train.seed, at most
    max_concurrent at a time."""
    from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter

    if cfg.sweep.search in ("random", "grid"):
        return BasicVariantGenerator(random_state=cfg.train.seed, max_concurrent=cfg.sweep.max_concurrent)
    import optuna
    from ray.tune.search.optuna import OptunaSearch

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # the sweep prints its own progress lines
    sampler = optuna.samplers.TPESampler(seed=cfg.train.seed)
    return ConcurrencyLimiter(OptunaSearch(sampler=sampler), max_concurrent=cfg.sweep.max_concurrent)


def scheduler(cfg: SweepRunConfig, max_t: int, epochs: int):
    """ASHA over epochs, or first-in-first-out for a grid (every combination runs to its end).

    A trial that survives every rung ends on its own and its runner closes its run; ASHA stops
    it only if max_t < epochs."""
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.sweep.search == "grid":
        return FIFOScheduler()
    return ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=cfg.sweep.grace_period,
                         reduction_factor=cfg.sweep.reduction_factor, stop_last_trials=max_t < epochs)
