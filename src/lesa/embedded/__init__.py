"""The embedded small text-to-image model: data, pipeline, checker, training."""
