"""Turning heterogeneous MRI datasets into catalog rows: layout adapters, harmonization, PHI handling, preprocessing."""
