"""Thin job entry points, each callable from the CLI, from a Ray job (``python -m brainiac.jobs.<name>``) and from tests."""
