"""Registry promotion: gates, the decision and its model card, and rollback."""
