"""Training: data loading, train step, checkpoints."""
