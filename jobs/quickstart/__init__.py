"""``brainiac quickstart``: the whole path from a synthetic cohort to a prediction, ending in one HTML report."""
