"""Dataset cards (YAML, package data): one per public dataset in the BrainIAC and peer pool, plus the synthetic cohorts."""
