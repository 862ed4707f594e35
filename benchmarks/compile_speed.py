"""Eager vs torch.compile wall-clock with lesa on, side by side, on the embedded model with a shipped predictor.

Each variant gets its own copy of the pipeline (compiling changes a module for good); the variants run interleaved in
one process, the first generation of each compiles (or warms up) and is not counted, and medians of `--repeats` are
reported, with the graphs dynamo compiled and its graph breaks per variant. Variants: eager; regional compilation
(`transformer.compile_repeated_blocks()`, diffusers' recipe: only the transformer blocks); whole-model compilation
(`transformer.compile()`). Example:

    python benchmarks/compile_speed.py --steps 50 --repeats 3 --backend inductor
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch._dynamo.testing import CompileCounterWithBackend
from torch._dynamo.utils import counters

import lesa
from lesa.models import load_pipeline, shipped_predictor


def compiled(how: str, backend: str) -> Callable[[object], CompileCounterWithBackend | None]:
    """A function that compiles a pipeline's transformer `how` ("eager": not at all) and returns its graph counter."""

    def apply(pipe) -> CompileCounterWithBackend | None:
        if how == "eager":
            return None
        counter = CompileCounterWithBackend(backend)
        if how == "regional":
            pipe.transformer.compile_repeated_blocks(backend=counter)
        else:
            pipe.transformer.compile(backend=counter)
        return counter

    return apply


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32, help="height and width in pixels")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--interval", type=int, default=7, help="the shipped predictor's interval N")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor needs a C++ compiler)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the uncached (lesa off) rows")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    # dynamo keeps compiled code per code object, shared by the variants' copies of one model: room for all of them
    # (past the default limit of 8 a frame silently runs eagerly)
    torch._dynamo.config.recompile_limit = 64

    predictor = str(shipped_predictor(args.interval))
    methods = {"lesa": lambda: lesa.LESAConfig(predictor=predictor)}
    if not args.no_baseline:
        methods = {"no cache": lambda: None, **methods}
    variants = {}
    for how in ("eager", "regional", "whole"):
        for method, config in methods.items():
            pipe = load_pipeline("embedded")
            pipe.set_progress_bar_config(disable=True)
            if (made := config()) is not None:
                lesa.enable(pipe, made)
            variants[f"{how}, {method}"] = (pipe, compiled(how, args.backend)(pipe))
    kwargs = dict(prompt="a red circle", num_inference_steps=args.steps, height=args.size, width=args.size)
    kwargs["output_type"] = "latent"

    seconds: dict[str, list[float]] = {name: [] for name in variants}
    first: dict[str, float] = {}
    breaks: dict[str, int] = {}
    outputs: dict[str, torch.Tensor] = {}
    for repeat in range(args.repeats + 1):  # repeat 0 compiles / warms up and is not counted
        for name, (pipe, _) in variants.items():
            before = sum(counters["graph_break"].values())
            start = time.perf_counter()
            out = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
            elapsed = time.perf_counter() - start
            if repeat:
                seconds[name].append(elapsed)
            else:
                first[name], breaks[name], outputs[name] = elapsed, sum(counters["graph_break"].values()) - before, out

    print(
        f"embedded model, {args.size}x{args.size}, {args.steps} steps (true CFG: 2 transformer calls a step), "
        f"lesa N={args.interval} shipped predictor, backend {args.backend}, {args.repeats} repeats (medians), "
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, dynamo recompile limit "
        f"{torch._dynamo.config.recompile_limit}"
    )
    print("| variant | s / generation | vs eager, same method | vs eager, no cache | first run s | graphs | breaks |")
    print("|---|---|---|---|---|---|---|")
    median = {name: statistics.median(s) for name, s in seconds.items()}
    base = median.get("eager, no cache")
    for name, (_, counter) in variants.items():
        same = median[f"eager, {name.split(', ')[1]}"]
        vs_base = f"{base / median[name]:.2f}x" if base else "-"
        graphs = counter.frame_count if counter else "-"
        print(
            f"| {name} | {median[name]:.3f} | {same / median[name]:.2f}x | {vs_base} | {first[name]:.1f} | {graphs} "
            f"| {breaks[name]} |"
        )
    for name, out in outputs.items():
        reference = outputs[f"eager, {name.split(', ')[1]}"]
        print(f"{name}: max |output - eager output| = {(out - reference).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
