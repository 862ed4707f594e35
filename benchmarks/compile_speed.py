"""Eager vs torch.compile wall-clock with lesa on, side by side, on the embedded model with a shipped predictor, or
(`--model flux-width`) on a FluxPipeline whose transformer has FLUX.1-dev's widths.

Each variant gets its own copy of the pipeline (compiling changes a module for good); the variants run interleaved in
one process, the first generation of each compiles (or warms up) and is not counted, and medians of `--repeats` are
reported, with the graphs dynamo compiled (in all after each generation: constant once every kind of step has run,
when no step recompiles) and its graph breaks per variant. Variants: eager; regional compilation
(`transformer.compile_repeated_blocks()`, diffusers' recipe: only the transformer blocks); whole-model compilation
(`transformer.compile()`). The first call of each kind (full, cached) runs eagerly to count its FLOPs, so a kind's
graphs can first compile in the second generation.

`--model flux-width`: FluxTransformer2DModel with FLUX.1-dev's widths (24 heads x 128, joint_attention_dim 4096,
pooled_projection_dim 768, in_channels 64, guidance embedding) and `--double`/`--single` blocks, random weights shared
by every variant's copy; in a FluxPipeline with FLUX.1-dev's scheduler config (dynamic shifting), random prompt
embeddings (`--text-tokens`), the tiny test pipeline's VAE (no downsampling: `--size` 32 gives 256 image tokens) and
an untrained LESA predictor (its cost does not depend on its weights). Examples:

    python benchmarks/compile_speed.py --steps 50 --repeats 3 --backend inductor
    python benchmarks/compile_speed.py --model flux-width --steps 4 --interval 2 --warmup 1 --repeats 2 --no-baseline
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
from lesa.adapters import model_class_name, pipeline_sigmas
from lesa.pipelines import load_pipeline, shipped_predictor
from lesa.predictor import LESAPredictor, PredictorConfig

# FLUX.1-dev's transformer widths and scheduler config
FLUX_DEV_WIDTHS = dict(
    patch_size=1,
    in_channels=64,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
FLUX_DEV_SCHEDULER = dict(
    shift=3.0,
    use_dynamic_shifting=True,
    base_image_seq_len=256,
    max_image_seq_len=4096,
    base_shift=0.5,
    max_shift=1.15,
)


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


class FluxWidth:
    """FluxPipelines around one random FLUX.1-dev-width transformer: each `pipeline()` has its own transformer module
    (compiling changes a module for good) holding the same weight tensors."""

    def __init__(self, double: int, single: int, text_tokens: int) -> None:
        from diffusers import FluxTransformer2DModel

        self.blocks = dict(num_layers=double, num_single_layers=single)
        torch.manual_seed(0)
        self.weights = FluxTransformer2DModel(**FLUX_DEV_WIDTHS, **self.blocks).eval().state_dict()
        self.params = sum(t.numel() for t in self.weights.values())
        generator = torch.Generator().manual_seed(0)
        self.prompt_embeds = torch.randn(1, text_tokens, FLUX_DEV_WIDTHS["joint_attention_dim"], generator=generator)
        self.pooled = torch.randn(1, FLUX_DEV_WIDTHS["pooled_projection_dim"], generator=generator)

    def pipeline(self):
        from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        try:
            from lesa.testing import tiny_flux_pipeline
        except ImportError:  # before the move to lesa.testing
            from lesa.models import tiny_flux_pipeline

        with torch.device("meta"):
            transformer = FluxTransformer2DModel(**FLUX_DEV_WIDTHS, **self.blocks)
        transformer.load_state_dict(self.weights, assign=True)  # the shared tensors, no copy
        tiny = tiny_flux_pipeline()  # VAE and tokenizers only: the prompt embeddings are given
        components = {**tiny.components, "transformer": transformer.eval()}
        components["scheduler"] = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
        return FluxPipeline(**components)

    def call_kwargs(self) -> dict:
        return dict(prompt_embeds=self.prompt_embeds, pooled_prompt_embeds=self.pooled, guidance_scale=3.5)


def untrained_lesa(pipe, steps: int, size: int, interval: int, warmup: int) -> lesa.LESAConfig:
    """A freshly initialised LESA predictor on the schedule the pipeline will use at this size."""
    torch.manual_seed(0)
    predictor = LESAPredictor(
        PredictorConfig(
            model_class=model_class_name(pipe.transformer),
            tap=lesa.get_adapter(pipe.transformer).tap,
            num_steps=steps,
            sigmas=pipeline_sigmas(pipe, steps, size, size).tolist(),
            feature_dim=pipe.transformer.inner_dim,
            interval=interval,
            warmup=warmup,
        )
    )
    return lesa.LESAConfig(predictor=predictor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=["embedded", "flux-width"], default="embedded")
    parser.add_argument("--size", type=int, default=32, help="height and width in pixels")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--interval", type=int, default=7, help="lesa's interval N (embedded: a shipped predictor's)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up E (default: flux-width 1, embedded 3)")
    parser.add_argument("--double", type=int, default=1, help="flux-width: double-stream blocks")
    parser.add_argument("--single", type=int, default=1, help="flux-width: single-stream blocks")
    parser.add_argument("--text-tokens", type=int, default=32, help="flux-width: prompt embedding length")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backend", default="inductor", help="torch.compile backend (inductor needs a C++ compiler)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the uncached (lesa off) rows")
    args = parser.parse_args()
    if args.warmup is None:
        args.warmup = 3 if args.model == "embedded" else 1
    if args.threads:
        torch.set_num_threads(args.threads)
    # dynamo keeps compiled code per code object, shared by the variants' copies of one model: room for all of them
    # (past the default limit of 8 a frame silently runs eagerly)
    torch._dynamo.config.recompile_limit = 64

    kwargs = dict(num_inference_steps=args.steps, height=args.size, width=args.size, output_type="latent")
    if args.model == "embedded":
        predictor = str(shipped_predictor())

        def make_lesa(pipe) -> lesa.LESAConfig:
            return lesa.LESAConfig(predictor=predictor, interval=args.interval, warmup=args.warmup)

        make_pipe = lambda: load_pipeline("embedded")  # noqa: E731
        kwargs["prompt"] = "a red circle"
        described = (
            f"embedded model, the shipped schedule-free predictor at N={args.interval}, true CFG: 2 transformer "
            "calls a step"
        )
    else:
        flux = FluxWidth(args.double, args.single, args.text_tokens)
        make_pipe = flux.pipeline

        def make_lesa(pipe) -> lesa.LESAConfig:
            return untrained_lesa(pipe, args.steps, args.size, args.interval, args.warmup)

        kwargs.update(flux.call_kwargs())
        tokens = (args.size // 2) ** 2
        described = (
            f"FluxTransformer2DModel at FLUX.1-dev widths, {args.double} double + {args.single} single blocks "
            f"({flux.params / 1e6:.0f}M params, random, fp32), {tokens} image + {args.text_tokens} text tokens, "
            f"FLUX.1-dev scheduler config (dynamic shifting), lesa N={args.interval} E={args.warmup} untrained "
            "predictor"
        )
    methods = {"lesa": make_lesa}
    if not args.no_baseline:
        methods = {"no cache": lambda pipe: None, **methods}
    variants = {}
    for how in ("eager", "regional", "whole"):
        for method, config in methods.items():
            pipe = make_pipe()
            pipe.set_progress_bar_config(disable=True)
            if (made := config(pipe)) is not None:
                lesa.enable(pipe, made)
            variants[f"{how}, {method}"] = (pipe, compiled(how, args.backend)(pipe))

    seconds: dict[str, list[float]] = {name: [] for name in variants}
    first: dict[str, float] = {}
    breaks: dict[str, int] = {}
    outputs: dict[str, torch.Tensor] = {}
    graphs_after: dict[str, list[int]] = {name: [] for name in variants}
    for repeat in range(args.repeats + 1):  # repeat 0 compiles / warms up and is not counted
        for name, (pipe, counter) in variants.items():
            before = sum(counters["graph_break"].values())
            start = time.perf_counter()
            out = pipe(generator=torch.Generator().manual_seed(0), **kwargs).images
            elapsed = time.perf_counter() - start
            graphs_after[name].append(counter.frame_count if counter else 0)
            if repeat:
                seconds[name].append(elapsed)
            else:
                first[name], breaks[name], outputs[name] = elapsed, sum(counters["graph_break"].values()) - before, out

    print(
        f"{described}; {args.size}x{args.size}, {args.steps} steps, backend {args.backend}, {args.repeats} repeats "
        f"(medians), torch {torch.__version__}, threads {torch.get_num_threads()}, dynamo recompile limit "
        f"{torch._dynamo.config.recompile_limit}"
    )
    print(
        "| variant | s / generation | vs eager, same method | vs eager, no cache | first run s "
        "| graphs after each run | breaks |"
    )
    print("|---|---|---|---|---|---|---|")
    median = {name: statistics.median(s) for name, s in seconds.items()}
    base = median.get("eager, no cache")
    for name, (_, counter) in variants.items():
        same = median[f"eager, {name.split(', ')[1]}"]
        vs_base = f"{base / median[name]:.2f}x" if base else "-"
        graphs = ", ".join(map(str, graphs_after[name])) if counter else "-"
        print(
            f"| {name} | {median[name]:.3f} | {same / median[name]:.2f}x | {vs_base} | {first[name]:.1f} | {graphs} "
            f"| {breaks[name]} |"
        )
    for name, out in outputs.items():
        reference = outputs[f"eager, {name.split(', ')[1]}"]
        print(f"{name}: max |output - eager output| = {(out - reference).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
