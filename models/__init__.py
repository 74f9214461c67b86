"""Encoders, self-supervised objectives, task heads and task specs for BrainIAC."""
