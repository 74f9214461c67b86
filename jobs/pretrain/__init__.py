"""SimCLR pretraining job: Ray Data stream of view pairs → Ray Train workers → checkpoints, MLflow, registry."""
