"""A trained model in use: model URIs, the predictor with its preprocessing, the MLflow pyfunc model."""
