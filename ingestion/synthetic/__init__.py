"""Synthetic multi-site brain MRI cohort with known truth (issue 3)."""
