"""contrastive-service: distributed large-batch contrastive pretraining on Ray, with MLflow."""

__version__ = "0.1.0"
