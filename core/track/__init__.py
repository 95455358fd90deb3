"""MLflow: where the store is, runs and their one way to end, links into the UI, the model registry, the tracking server."""
