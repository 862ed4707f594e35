"""Evaluation helpers for `lesa bench`: image-quality metrics live in `lesa.evaluate.metrics`."""
