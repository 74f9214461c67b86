"""Task specs, heads, losses and metrics of the fine-tuning engine."""
