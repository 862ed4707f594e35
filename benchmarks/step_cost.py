"""Side-by-side cost of full and cached transformer calls per method, and end-to-end wall-clock speed-up.

Methods run interleaved in one process, several repeats, medians reported. The "lesa" row is a freshly initialised
predictor (its cost does not depend on its weights); `--predictor DIR` adds trained ones. Example:

    python benchmarks/step_cost.py --height 128 --width 128 --steps 50 --repeats 3
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import lesa
from lesa.adapters import model_class_name, pipeline_sigmas
from lesa.pipelines import load_pipeline
from lesa.predictor import LESAPredictor, PredictorConfig


def untrained_predictor(pipe, steps: int, height: int, width: int, interval: int, warmup: int) -> LESAPredictor:
    # the schedule the pipeline will use at this size (dynamic-shifting FLUX configs shift it by the token count)
    sigmas = pipeline_sigmas(pipe, steps, height, width)
    torch.manual_seed(0)
    return LESAPredictor(
        PredictorConfig(
            model_class=model_class_name(pipe.transformer),
            tap=lesa.get_adapter(pipe.transformer).tap,
            num_steps=steps,
            sigmas=sigmas.tolist(),
            feature_dim=pipe.transformer.inner_dim,
            interval=interval,
            warmup=warmup,
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None)
    parser.add_argument("--height", type=int, default=128)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--interval", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--predictor", action="append", default=[], help="trained predictor(s) to time as well")
    args = parser.parse_args()

    pipe = load_pipeline(args.model)
    sched = dict(interval=args.interval, warmup=args.warmup)
    trained = {}
    for directory in args.predictor:
        predictor = LESAPredictor.from_pretrained(directory)
        c = predictor.config
        if (c.interval, c.warmup) != (args.interval, args.warmup):
            parser.error(
                f"{directory} is for N={c.interval}, E={c.warmup}: pass --interval {c.interval} --warmup {c.warmup}"
            )
        trained[f"lesa ({c.memory} memory, K={max(c.windows)})"] = lesa.LESAConfig(predictor=predictor)
    methods = {
        "none": lesa.NoCacheConfig(),
        "fora": lesa.FORAConfig(**sched),
        "taylorseer O1": lesa.TaylorSeerConfig(order=1, **sched),
        "taylorseer O2": lesa.TaylorSeerConfig(order=2, **sched),
        "lesa": lesa.LESAConfig(predictor=untrained_predictor(pipe, args.steps, args.height, args.width, **sched)),
        **trained,
    }
    call_times: dict[str, dict[bool, list[float]]] = {m: {True: [], False: []} for m in methods}
    totals: dict[str, list[float]] = {m: [] for m in methods}
    flops: dict[str, float] = {}
    kwargs = dict(
        prompt="a red circle",
        num_inference_steps=args.steps,
        height=args.height,
        width=args.width,
        output_type="latent",
    )

    for repeat in range(args.repeats + 1):  # repeat 0 warms up and is not counted
        for name, config in methods.items():
            runtime = lesa.enable(pipe, config)
            last = {}
            runtime.observers.append(lambda e, last=last: last.update(full=e.full))
            starts: list[float] = []

            def before(*_, starts=starts) -> None:
                starts.append(time.perf_counter())

            def after(*_, name=name, starts=starts, last=last, counted=bool(repeat)) -> None:
                if counted:
                    call_times[name][last["full"]].append(time.perf_counter() - starts[-1])

            pre = pipe.transformer.register_forward_pre_hook(before)
            post = pipe.transformer.register_forward_hook(after)
            start = time.perf_counter()
            pipe(generator=torch.Generator().manual_seed(0), **kwargs)
            if repeat:
                totals[name].append(time.perf_counter() - start)
            pre.remove()
            post.remove()
            flops[name] = lesa.summary(pipe)["flops_speedup"]
            lesa.disable(pipe)

    base = statistics.median(totals["none"])
    full_call = statistics.median(call_times["none"][True])
    print(
        f"{args.height}x{args.width}, {args.steps} steps, N={args.interval}, E={args.warmup}, "
        f"{args.repeats} repeats (medians), torch threads {torch.get_num_threads()}"
    )
    print("| method | FLOPs speed-up (counted) | wall speed-up | full call ms | cached call ms | cached / full |")
    print("|---|---|---|---|---|---|")
    for name in methods:
        cached = call_times[name][False]
        cached_ms = statistics.median(cached) * 1e3 if cached else float("nan")
        print(
            f"| {name} | {flops[name]:.2f}x | {base / statistics.median(totals[name]):.2f}x | "
            f"{statistics.median(call_times[name][True]) * 1e3:.2f} | {cached_ms:.3f} | "
            f"{cached_ms / (full_call * 1e3):.3f} |"
        )
    ts = statistics.median(call_times["taylorseer O1"][False])
    for name in ["lesa", *trained]:
        print(f"{name} cached call / TaylorSeer O1 cached call: {statistics.median(call_times[name][False]) / ts:.2f}")


if __name__ == "__main__":
    main()
