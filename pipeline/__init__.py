"""Distributed ImageNet training on Ray Train / Tune with MLflow tracking."""
