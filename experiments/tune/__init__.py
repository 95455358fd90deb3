"""Sweeps through Ray Tune: the sweep plan, search spaces, trials, the driver. The only wing that imports Ray."""
