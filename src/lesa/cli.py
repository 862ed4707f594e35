"""The `lesa` command line: record, train, generate, bench, ensemble."""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from .checks import MissingDependency, check_numbers
from .evaluate.methods import FAMILIES
from .training import DEFAULT_RECIPE, RECIPES


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr, exit status 2, like every other `lesa` error (the
    usage stays in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _finite(text: str) -> float:
    """A float option's value: NaN and infinities are refused (a NaN guidance scale silently turns guidance off)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expects a finite number, got {text!r}")
    return value


def _pipeline_args(p: argparse.ArgumentParser, model_help: str, offload: bool = True) -> None:
    p.add_argument("--model", default=None, help=model_help)
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--dtype", default=None, help="pipeline dtype (default: bfloat16 on cuda, float32 on cpu)")
    if offload:
        p.add_argument(
            "--cpu-offload",
            action="store_true",
            help="keep the pipeline on the CPU and move one model at a time to --device (enable_model_cpu_offload)",
        )


def _dry_run_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument(
        "--dry-run",
        action="store_true",
        help=f"print the estimate ({what}) from the model's config files, load nothing, run nothing, and exit "
        "(lesa estimate has every option)",
    )


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lesa", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    model_help = (
        "local diffusers pipeline directory, hub id, 'embedded', or a tiny random pipeline built offline: "
        "tiny-random-flux, tiny-random-qwenimage, tiny-random-hunyuanvideo, tiny-random-wan, tiny-random-sd3 (default: "
        "embedded when "
        "its weights are installed, else tiny-random-flux)"
    )

    rec = sub.add_parser("record", help="record feature trajectories of the unaccelerated pipeline")
    _pipeline_args(rec, model_help)
    rec.add_argument("--prompts", required=True, help="text file, one prompt per line")
    rec.add_argument("--out", required=True, help="output directory (resumed if it holds a matching recording)")
    rec.add_argument("--steps", type=int, default=50)
    rec.add_argument("--height", type=int, default=None)
    rec.add_argument("--width", type=int, default=None)
    rec.add_argument("--seed", type=int, default=0, help="prompt i uses seed + i")
    rec.add_argument("--guidance-scale", type=_finite, default=None)
    rec.add_argument("--negative-prompt", default=None, help="negative prompt of the unconditional (CFG) pass")
    rec.add_argument(
        "--true-cfg-scale",
        type=_finite,
        default=None,
        help="true-CFG scale of FLUX / Qwen-Image (with --negative-prompt)",
    )
    rec.add_argument("--num-frames", type=int, default=None, help="frames of a video pipeline")
    rec.add_argument("--record-dtype", default="bfloat16", help="dtype of the stored features (default bfloat16)")
    _dry_run_arg(rec, "disk, peak memory, FLOPs and time of this recording")

    tr = sub.add_parser(
        "train",
        help="train a LESA predictor (closed loop through the sampler; the paper recipe: phase gt, then clar)",
        description="Train a predictor from a recording. The recipe sets every training setting; --config FILE "
        "and --set KEY=VALUE change any of them (the settings and their defaults: --print-config, "
        "docs/train-settings.md); the options below are the ones most runs change.",
    )
    _pipeline_args(tr, "pipeline for the closed loop and validation (default: the recorded one)", offload=False)
    tr.add_argument(
        "--cpu-offload",
        action="store_true",
        help="keep every model but the transformer (text encoders, VAE) on the CPU, moved to --device for its own "
        "calls only: the same updates, the encoders' weights off the device",
    )
    tr.add_argument(
        "--data",
        required=True,
        action="append",
        help="a `lesa record` output directory (repeatable with --recipe schedule-free: one per step count)",
    )
    tr.add_argument("--out", required=True, help="predictor directory to write (resumed from its checkpoints)")
    tr.add_argument(
        "--val-data",
        default=None,
        action="append",
        help="a recording of other prompts (same settings) to validate on instead of a split of --data: checkpoints, "
        "start, placement and correction are chosen on it (a few hundred trajectories give a reliable choice); "
        "one per --data, in the same order",
    )
    tr.add_argument(
        "--recipe",
        choices=tuple(RECIPES),
        default=DEFAULT_RECIPE,
        help=f"named settings (default {DEFAULT_RECIPE}; paper: the faithful reproduction)",
    )
    tr.add_argument("--interval", type=int, default=None, help="N: a full step every N steps (default 7)")
    tr.add_argument("--warmup", type=int, default=None, help="E: steps 0..E are full (default 3)")
    tr.add_argument("--batch-size", type=int, default=None, help="trajectories per minibatch (default 8)")
    tr.add_argument(
        "--micro-batch",
        type=int,
        default=None,
        help="roll out this many trajectories at a time, gradients accumulated (less memory, same update)",
    )
    tr.add_argument("--seeds", type=int, default=None, help="train K seeds, keep the best on validation (default 1)")
    tr.add_argument("--config", default=None, help="a JSON or TOML file of settings (e.g. from --print-config)")
    tr.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="one setting, e.g. --set epochs_clar=4 --set windows=3,3,3 (repeatable; wins over --config)",
    )
    tr.add_argument("--print-config", action="store_true", help="print the effective settings as JSON and exit")
    tr.add_argument("--restart", action="store_true", help="ignore existing checkpoints in --out")
    _dry_run_arg(tr, "peak memory of each phase, the settings that fit, FLOPs and GPU-hours of this training run")

    gen = sub.add_parser("generate", help="generate an image or a video, accelerated")
    _pipeline_args(gen, model_help)
    gen.add_argument("--prompt", required=True)
    gen.add_argument(
        "--out",
        required=True,
        help="output file: an image (.png, .jpg); a video as .gif, a directory of PNG frames (no suffix) or, with "
        "imageio-ffmpeg or OpenCV installed, .mp4",
    )
    gen.add_argument("--cache", choices=("none", "fora", "taylorseer", "lesa"), default="lesa")
    gen.add_argument("--predictor", default=None, help="LESA predictor directory")
    gen.add_argument(
        "--speedup",
        type=_finite,
        default=None,
        help="budget: steps per full step, for any --steps (default: a schedule-free predictor's own, 5)",
    )
    gen.add_argument(
        "--full-steps", type=int, default=None, help="budget as a count of full steps (not with --speedup)"
    )
    gen.add_argument("--interval", type=int, default=None, help="N: a full step every N steps instead of a budget")
    gen.add_argument("--warmup", type=int, default=None, help="E (default: the predictor's, else 3)")
    gen.add_argument("--order", type=int, default=1, help="TaylorSeer order")
    gen.add_argument("--damping", type=_finite, default=1.0, help="TaylorSeer damping of the difference terms")
    gen.add_argument("--steps", type=int, default=50)
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--height", type=int, default=None)
    gen.add_argument("--width", type=int, default=None)
    gen.add_argument("--guidance-scale", type=_finite, default=None)
    gen.add_argument("--negative-prompt", default=None, help="negative prompt of the unconditional (CFG) pass")
    gen.add_argument("--true-cfg-scale", type=_finite, default=None, help="true-CFG scale (FLUX / Qwen-Image)")
    gen.add_argument("--num-frames", type=int, default=None, help="frames of a video pipeline")
    gen.add_argument("--fps", type=int, default=8, help="frame rate of a written video")
    gen.add_argument("--json", action="store_true", help="print one JSON object with the measurements")
    _dry_run_arg(gen, "peak memory, FLOPs, time and speed-up of this generation")
    b = sub.add_parser("bench", help="quality against speed-up: LESA and baselines at matched full-step budgets")
    _pipeline_args(b, model_help)
    b.add_argument("--prompts", required=True, help="evaluation prompts (disjoint from every fitting/training prompt)")
    b.add_argument("--out", required=True, help="directory for results.json, results.md, pareto.png")
    b.add_argument(
        "--predictor",
        action="append",
        default=[],
        help="LESA predictor directory (repeatable; several of one schedule are seeds of one row); its schedule "
        "sets a budget, also when --methods leaves out lesa",
    )
    b.add_argument("--methods", default=",".join(FAMILIES), help=f"comma-separated subset of: {', '.join(FAMILIES)}")
    b.add_argument("--steps", type=int, default=50)
    b.add_argument("--intervals", default="7,10", help="budgets (N) when no predictor sets them")
    b.add_argument(
        "--speedups",
        default=None,
        help="budgets by speed-up (steps per full step), e.g. 2.5,4,5,6.25, for any --steps: schedule-free "
        "predictors on their own placement, every fixed method on it and on the uniform one",
    )
    b.add_argument("--warmup", type=int, default=3, help="E of the budgets when no predictor sets them")
    b.add_argument(
        "--fit-data",
        default=None,
        help="a `lesa record` directory of the predictor's training prompts, "
        "for the calibrated baselines and threshold searches",
    )
    b.add_argument("--fit-prompts", default=None, help="prompts to record fitting data from when --fit-data is absent")
    b.add_argument("--fit-count", type=int, default=20, help="how many --fit-prompts to record")
    b.add_argument("--search-prompts", type=int, default=4, help="fitting prompts used to search thresholds")
    b.add_argument("--search-iterations", type=int, default=12, help="bisection steps of each threshold search")
    b.add_argument("--repeats", type=int, default=3, help="interleaved timing repeats")
    b.add_argument("--timing-prompts", type=int, default=4, help="prompts in each timing repeat")
    b.add_argument("--limit", type=int, default=None, help="use only the first L evaluation prompts")
    b.add_argument("--seed", type=int, default=0, help="evaluation prompt i uses seed + i (reference and every method)")
    b.add_argument("--guidance-scale", type=_finite, default=None)
    b.add_argument("--height", type=int, default=None)
    b.add_argument("--width", type=int, default=None)
    b.add_argument("--lpips-weights", nargs="+", default=[], help="AlexNet + LPIPS weight files (local)")
    b.add_argument("--clip", default=None, help="local CLIP model directory for the CLIP score")
    b.add_argument("--image-reward", default=None, help="local ImageReward checkpoint (needs the ImageReward package)")
    est = sub.add_parser(
        "estimate", help="peak memory, FLOPs, time and disk of record / train / generate, from config files only"
    )
    from .estimate import add_arguments as estimate_arguments

    estimate_arguments(est)
    ens = sub.add_parser("ensemble", help="average predictors of one schedule (seeds) into one, at one's cost")
    ens.add_argument("predictors", nargs="+", help="predictor directories trained for the same schedule and config")
    ens.add_argument("--out", required=True, help="predictor directory to write")
    return parser


def _ints(text: str, name: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--{name} expects comma-separated integers, got {text!r}") from None


def _floats(text: str, name: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--{name} expects comma-separated numbers, got {text!r}") from None


def _record(args) -> int:
    from .distributed import init_distributed
    from .pipelines import load_pipeline, model_label
    from .record import check_record_arguments, read_prompts, record

    # record() checks these too; here they are refused before the pipeline loads
    check_record_arguments(
        steps=args.steps,
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        guidance_scale=args.guidance_scale,
        true_cfg_scale=args.true_cfg_scale,
        dtype=args.record_dtype,
    )
    prompts = read_prompts(args.prompts)
    if args.dry_run:
        from .estimate import Workload, dry_run

        work = Workload(
            steps=args.steps,
            height=args.height,
            width=args.width,
            num_frames=args.num_frames,
            guidance_scale=args.guidance_scale,
            true_cfg_scale=args.true_cfg_scale,
            negative_prompt=args.negative_prompt,
            dtype=args.dtype or "bfloat16",
            record_dtype=args.record_dtype,
            prompts=len(prompts),
            cpu_offload=args.cpu_offload,
        )
        print(dry_run(args.model, work, "record"))
        return 0
    dist = init_distributed(args.device)  # under torchrun: join the group; alone: nothing happens
    pipe = load_pipeline(args.model, dist.device, args.dtype, args.cpu_offload)
    result = record(
        pipe,
        prompts,
        args.out,
        model=model_label(args.model),
        steps=args.steps,
        height=args.height,
        width=args.width,
        seed=args.seed,
        dtype=args.record_dtype,
        guidance_scale=args.guidance_scale,
        negative_prompt=args.negative_prompt,
        true_cfg_scale=args.true_cfg_scale,
        num_frames=args.num_frames,
    )
    if dist.is_main:
        print(f"recorded {result.recorded} prompt(s) ({result.skipped} already done): {result.manifest}")
    return 0


def _train_config(args):
    """The TrainConfig of `lesa train`'s arguments: the recipe's settings, then those of --config, then every option
    and --set given (a setting nobody gave keeps the recipe's value)."""
    from .settings import load_settings, parse_setting
    from .training import TrainConfig

    given = load_settings(TrainConfig, args.config) if args.config else {}
    options = ("interval", "warmup", "batch_size", "micro_batch", "seeds")
    given.update({k: getattr(args, k) for k in options if getattr(args, k) is not None})
    given.update(parse_setting(TrainConfig, item) for item in args.set)
    if args.val_data and "val_fraction" not in given:  # with a validation recording, train on every trajectory
        given["val_fraction"] = 0.0
    return TrainConfig.from_recipe(args.recipe, **given)


def _train(args) -> int:
    import shutil

    from .distributed import init_distributed
    from .estimate import check_train
    from .pipelines import load_pipeline
    from .predictor import check_predictor_dir
    from .recording import Recording
    from .training import ScheduleFreeTrainer, Trainer, check_validation_recording

    config = _train_config(args)  # bad options are refused before any data is read
    if args.print_config:
        from .settings import settings_json

        print(settings_json(config), end="")
        return 0
    check_predictor_dir(args.out)  # the predictor is saved there at the end: refused now, not hours later
    recs = [Recording(d) for d in args.data]
    validations = None if args.val_data is None else [Recording(d) for d in args.val_data]
    if config.format == 1 and (len(recs) > 1 or len(validations or []) > 1):
        raise ValueError(
            "several --data / --val-data recordings train one schedule-free predictor: add --recipe schedule-free "
            "(or --set format=2)"
        )
    if validations is not None and len(validations) != len(recs):
        raise ValueError(f"{len(validations)} --val-data for {len(recs)} --data: give one per --data, in order")
    for rec, validation in zip(recs, validations or [None] * len(recs), strict=True):
        if validation is not None:
            # refused before the pipeline loads; the Trainer checks again and gives the notices (once, on rank 0)
            check_validation_recording(rec, validation, notice=lambda _: None)
    # the recording whose rollouts need the most memory: a schedule-free run's of the most steps (its densest cell)
    first = max(range(len(recs)), key=lambda i: recs[i].settings["steps"])
    rec, validation = recs[first], None if validations is None else validations[first]
    model = args.model or rec.settings["model"]
    dtype = args.dtype or "bfloat16"
    if args.dry_run:
        from .estimate import dry_run, train_workload

        work = train_workload(rec, config, dtype, validation, recipe=args.recipe, cpu_offload=args.cpu_offload)
        print(dry_run(model, work, "train", config))
        return 0
    dist = init_distributed(args.device)  # under torchrun: join the group; alone: nothing happens
    # on an accelerator, a configuration whose estimated peak exceeds its memory is refused now, with settings that fit
    check_train(model, rec, config, dist.device, dtype=dtype, validation=validation, cpu_offload=args.cpu_offload)
    pipe = load_pipeline(model, dist.device, args.dtype, offload_encoders=args.cpu_offload)
    if args.restart and dist.is_main:  # only rank 0 reads checkpoints
        shutil.rmtree(Path(args.out) / "checkpoints", ignore_errors=True)
        (Path(args.out) / "schedule.json").unlink(missing_ok=True)
    if config.format == 2:
        ScheduleFreeTrainer(recs, pipe, args.out, config, validations=validations).run()
    else:
        Trainer(rec, pipe, args.out, config, validation=validation).run()
    return 0


def _estimate(args) -> int:
    from .estimate import run

    return run(args)


def _ensemble(args) -> int:
    from .predictor import LESAPredictor, check_predictor_dir

    out = Path(args.out).resolve()
    for d in args.predictors:
        if Path(d).resolve() == out:
            raise ValueError(f"--out {args.out} is one of the predictors to ensemble; write the ensemble elsewhere")
    check_predictor_dir(args.out)
    model = LESAPredictor.ensemble([LESAPredictor.from_pretrained(d) for d in args.predictors])
    members = "\n".join(f"- `{d}`" for d in args.predictors)
    card = (
        f"# LESA predictor: seed ensemble of {model.config.members}\n\nWritten by `lesa ensemble`: the per-step "
        f"forecast coefficients are the mean of these predictors' (a forecast costs what one predictor's does):\n\n"
        f"{members}\n"
    )
    model.save_pretrained(args.out, card=card)
    print(f"wrote a seed ensemble of {model.config.members} predictor(s) to {args.out}")
    return 0


def _dry_run_generate(args, config) -> str:
    from .estimate import Workload, dry_run
    from .schedule import full_step_count

    if args.cache == "none":
        budget = {"full_steps": args.steps}
    elif config.budgeted:
        budget = {"full_steps": full_step_count(args.steps, config.speedup, config.full_steps)}
    else:
        budget = {"interval": config.interval, "warmup": config.warmup}
    work = Workload(
        steps=args.steps,
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        guidance_scale=args.guidance_scale,
        true_cfg_scale=args.true_cfg_scale,
        negative_prompt=args.negative_prompt,
        dtype=args.dtype or "bfloat16",
        cpu_offload=args.cpu_offload,
        **budget,
    )
    return dry_run(args.model, work, "generate")


def _generate(args) -> int:
    from . import FORAConfig, LESAConfig, NoCacheConfig, TaylorSeerConfig, enable, summary
    from .media import check_output_path, save_video
    from .pipelines import EMBEDDED_MODEL, load_pipeline, model_label, pipeline_output, shipped_predictor
    from .testing import TINY_MODELS

    sizes = [("--height", args.height), ("--width", args.width), ("--num-frames", args.num_frames)]
    check_numbers([("--steps", args.steps), ("--fps", args.fps), ("--interval", args.interval), *sizes], 1)
    check_numbers([("--warmup", args.warmup), ("--order", args.order)], 0)
    check_numbers([("--speedup", args.speedup), ("--full-steps", args.full_steps)], 1)
    if args.speedup is not None and args.full_steps is not None:
        raise ValueError("give --speedup or --full-steps, not both")
    if args.interval is not None and (args.speedup is not None or args.full_steps is not None):
        raise ValueError("--interval is a fixed schedule; a budget (--speedup / --full-steps) replaces it: give one")
    options = (("interval", args.interval), ("warmup", args.warmup), ("speedup", args.speedup))
    schedule = {k: v for k, v in (*options, ("full_steps", args.full_steps)) if v is not None}
    if args.cache == "lesa":
        predictor = args.predictor
        if predictor is None:
            if model_label(args.model) != EMBEDDED_MODEL:
                raise ValueError("--cache lesa needs --predictor DIR (predictors ship only for the embedded model)")
            predictor = shipped_predictor()
        config = LESAConfig(predictor=predictor, **schedule).resolve()  # a bad predictor is refused before loading
    elif args.cache == "fora":
        config = FORAConfig(**schedule)
    elif args.cache == "taylorseer":
        config = TaylorSeerConfig(order=args.order, damping=args.damping, **schedule)
    else:
        config = NoCacheConfig()
    if args.dry_run:
        print(_dry_run_generate(args, config))
        return 0
    pipe = load_pipeline(args.model, args.device, args.dtype, args.cpu_offload)
    video = hasattr(pipe, "video_processor")
    check_output_path(args.out, video)
    label = model_label(args.model)
    if label in TINY_MODELS and not args.json:
        print(
            f"note: using {label}, a tiny {type(pipe).__name__} with random weights built locally; its output is "
            "noise (the workflow runs, the picture means nothing)",
            file=sys.stderr,
        )
    enable(pipe, config)
    kwargs = {"num_inference_steps": args.steps}
    for key in ("height", "width", "guidance_scale", "negative_prompt", "true_cfg_scale", "num_frames"):
        if getattr(args, key) is not None:
            kwargs[key] = getattr(args, key)
    accepted = inspect.signature(pipe.__call__).parameters
    unknown = [f"--{k.replace('_', '-')}" for k in kwargs if k not in accepted]
    if unknown:
        raise ValueError(f"{type(pipe).__name__} does not take {', '.join(unknown)}")
    device = "cpu" if args.cpu_offload else str(pipe.transformer.device)
    start = time.perf_counter()
    result = pipeline_output(
        pipe(prompt=args.prompt, generator=torch.Generator(device).manual_seed(args.seed), **kwargs)
    )[0]
    seconds = time.perf_counter() - start
    out = Path(args.out)
    if video:
        save_video(result, out, fps=args.fps)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        result.save(out)
    info = summary(pipe)
    if args.cache != "none" and info["full_steps"] == info["steps"]:
        print(
            f"note: all {info['steps']} steps ran the trunk: nothing was cached (speed-up 1.00x). For few-step "
            "(distilled) models use e.g. --warmup 1 --interval 2 (docs/models.md, 'Few-step models')",
            file=sys.stderr,
        )
    result = {
        "model": model_label(args.model),
        "cache": args.cache,
        "steps": info["steps"],
        "full_steps": info["full_steps"],
        "full_step_indices": info["full_step_indices"],
        "trunk_speedup": info["trunk_speedup"],
        "flops_speedup": info["flops_speedup"],
        "head_share": info["head_share"],
        "seconds": seconds,
        "out": str(out),
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{args.cache}: {info['full_steps']} of {info['steps']} steps ran the trunk ({info['full_step_indices']}); "
            "FLOPs speed-up "
            f"{info['flops_speedup']:.2f}x (counted; cached step costs {info['head_share'] or 0:.1%} of a full "
            f"one); {seconds:.2f} s; wrote {out}"
        )
    return 0


def _bench(args) -> int:
    from .evaluate.bench import Bench, BenchConfig

    cfg = BenchConfig(
        prompts=args.prompts,
        out=args.out,
        model=args.model,
        predictors=args.predictor,
        methods=[m.strip() for m in args.methods.split(",") if m.strip()],
        steps=args.steps,
        intervals=list(_ints(args.intervals, "intervals")),
        speedups=list(_floats(args.speedups, "speedups")) if args.speedups else [],
        warmup=args.warmup,
        fit_data=args.fit_data,
        fit_prompts=args.fit_prompts,
        fit_count=args.fit_count,
        search_prompts=args.search_prompts,
        search_iterations=args.search_iterations,
        repeats=args.repeats,
        timing_prompts=args.timing_prompts,
        limit=args.limit,
        seed=args.seed,
        guidance_scale=args.guidance_scale,
        height=args.height,
        width=args.width,
        device=args.device,
        dtype=args.dtype,
        lpips_weights=args.lpips_weights,
        clip=args.clip,
        image_reward=args.image_reward,
    )
    results = Bench(cfg)()
    print(open(Path(args.out) / "results.md").read())
    return 0 if results["rows"] else 1


# config fields whose option is not named after them
_FIELD_OPTIONS = {"dtype": "record_dtype"}


def _in_option_terms(parser: argparse.ArgumentParser, command: str, message: str) -> str:
    """A library check's "FIELD must be ..." as "--OPTION must be ...", where FIELD is set by an option of `command`
    (the user typed the option, not the config field)."""
    field, sep, rest = message.partition(" must be ")
    field = field.removeprefix("bench ")
    if not sep or " " in field:
        return message
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    options = {a.dest: a.option_strings[0] for a in sub._actions if a.option_strings}
    option = options.get(_FIELD_OPTIONS.get(field, field))
    if option is None and command == "train":  # a setting without an option of its own
        from .training import TrainConfig

        option = f"--set {field}" if field in TrainConfig.__dataclass_fields__ else None
    return f"{option} must be {rest}" if option else message


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    handlers = {
        "record": _record,
        "train": _train,
        "generate": _generate,
        "bench": _bench,
        "ensemble": _ensemble,
        "estimate": _estimate,
    }
    try:
        return handlers[args.command](args)
    except (ValueError, FileNotFoundError, OSError, RuntimeError, MissingDependency) as e:
        if os.environ.get("LESA_DEBUG"):
            raise
        rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
        message = _in_option_terms(parser, args.command, str(e)) if isinstance(e, ValueError) else str(e)
        print(f"lesa {args.command}{f' (rank {rank})' if rank else ''}: error: {message}", file=sys.stderr)
        return 2
    finally:
        from .distributed import shutdown

        shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
