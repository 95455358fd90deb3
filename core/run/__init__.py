"""One tracked run: a training loop driven, logged to MLflow each epoch, checkpointed, resumed, its model logged; above serve, since a fine-tune logs the served model."""
