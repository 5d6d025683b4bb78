"""contrastive-service."""
