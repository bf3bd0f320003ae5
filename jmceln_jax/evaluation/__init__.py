"""Evaluation: the metrics, the jitted evaluator, a saved run's offline
evaluation, and the drawings of predictions."""
