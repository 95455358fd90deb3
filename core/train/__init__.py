"""Training: augmentation (CPU and device), models, losses, the one epoch loop, fine-tuning, metrics and figures, the tracked runner."""
