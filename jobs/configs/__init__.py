"""Shipped YAML configs (package data): production defaults and ``tiny`` ones for tests and the quickstart."""
