"""Distributed ImageNet training on Ray Train / Tune with MLflow tracking."""

import os

# MLflow 3.17 unpickles logged models by default (torch.load(weights_only=False), the pickle module a model
# folder names, and the weights inside a pt2 archive): a model anyone logged would be code. This project only
# publishes torch.export (pt2) models, which MLflow checks for pickle-free records when this is off. Forced off in
# every process that imports the pipeline (CLI, drivers, Ray workers), whatever the environment says.
os.environ["MLFLOW_ALLOW_PICKLE_DESERIALIZATION"] = "false"
