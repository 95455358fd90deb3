"""skinclr core: the trainer library (data, augmentation, models, losses, loops, metrics, tracking).

Never imports Ray: the Ray Tune layer in `experiments/` drives these loops from outside.
"""
import os

# albumentations checks PyPI for updates at import unless told not to; nothing here may
# reach the network at run time.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# A model load downloads a few dozen small files; MLflow's per-load progress bar is noise.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

__version__ = "0.1.0"
