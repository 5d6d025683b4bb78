"""contrastive-service: distributed large-batch contrastive pretraining on Ray, tracked in MLflow."""

__version__ = "0.1.0"
