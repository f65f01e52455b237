"""Training: params and the training loop (no stages, caching or MLflow here)."""
