"""Evaluation beyond the training loop: tasks for lm-evaluation-harness (``harness``)."""
