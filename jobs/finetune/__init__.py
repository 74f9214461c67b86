"""Fine-tuning job: task data from the catalog → Ray Tune sweep of Ray Train trials → selection, test, registry."""
