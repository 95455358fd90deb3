"""skinclr: self-supervised pretraining and fine-tuning for skin-lesion classification, tracked in MLflow.

The library's wings, lowest first (a wing imports only those before it): the shared vocabulary
(`names`, `config`, `runtime`), `data`, `track`, `train`, `serve`, `report`. Above them, and
never imported by them: `tune` (the only code that imports Ray) and `cli`.
"""
import os

# albumentations checks PyPI for updates at import unless told not to; nothing here may
# reach the network at run time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# A model load downloads a few dozen small files; MLflow's per-load progress bar is noise.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

__version__ = "0.1.0"

# The pretraining methods' registry (torch-free): it gives the config schema each method's section,
# so every Config, however this package is entered, knows every method.
import skinclr.train.methods  # noqa: E402,F401
