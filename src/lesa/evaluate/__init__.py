"""Evaluation for `lesa bench` (`bench_pipeline(pipe, prompts, out, ...)` on a pipeline object); image-quality metrics
live in `lesa.evaluate.metrics`."""


def bench_pipeline(pipe, prompts, out, **options):
    """`lesa bench` on a pipeline object: see `lesa.evaluate.bench.bench_pipeline` (imported on call: the bench loads
    a lot)."""
    from .bench import bench_pipeline as run

    return run(pipe, prompts, out, **options)
