"""`lesa bench`: quality against speed for LESA and its baselines, at matched full-step budgets, on one pipeline.

Per prompt i (seed `--seed` + i) the unaccelerated image is the reference; every method then generates from the same
seed. Evaluation trajectories (model, settings, prompt, seed: `lesa.trajectories`) that are fitting trajectories are
refused; those a predictor was trained or selected on, or that share a fitting trajectory's noise, are noticed.
Work is counted by one meter for every method (`work.py`); wall-clock speed-up comes from a separate pass in which
the methods are interleaved (rotating order) over several repeats and the median is taken.
"""

from __future__ import annotations

import importlib.util
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..adapters import get_adapter, model_class_name, pipeline_sigmas
from ..checks import check_numbers
from ..io import atomic_path, atomic_write_text
from ..record import read_prompts, record
from ..recording import Recording
from ..schedule import StepSchedule
from ..trajectories import Pair, Trajectories, check_disjoint, describe, overlap, stderr_notice
from .methods import (
    FAMILIES,
    NEEDS_FIT_DATA,
    SAME_ON_ANY_PLACEMENT,
    SEARCHED,
    Budget,
    Method,
    bench_schedules,
    fixed_methods,
    lesa_methods,
    searched_method,
    speedup_budgets,
)
from .work import GenerationWork, WorkMeter, trunk_executions

FIT_SEED = 0  # the seed base of --fit-prompts' trajectories: `lesa record`'s default


@dataclass
class BenchConfig:
    prompts: str
    out: str
    model: str | None = None
    predictors: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=lambda: list(FAMILIES))
    steps: int = 50
    intervals: list[int] = field(default_factory=lambda: [7, 10])  # budgets when no predictor gives them
    # budgets by speed-up instead (any --steps): schedule-free predictors on their own placement, and every fixed
    # method on it and on the uniform one
    speedups: list[float] = field(default_factory=list)
    warmup: int = 3
    fit_data: str | None = None
    fit_prompts: str | None = None
    fit_count: int = 20
    search_prompts: int = 4
    search_iterations: int = 12
    repeats: int = 3
    timing_prompts: int = 4
    limit: int | None = None
    seed: int = 0  # evaluation prompt i uses seed + i
    guidance_scale: float | None = None
    height: int | None = None
    width: int | None = None
    device: str | None = None
    dtype: str | None = None
    lpips_weights: list[str] = field(default_factory=list)
    clip: str | None = None
    image_reward: str | None = None

    def __post_init__(self) -> None:
        for name in ("repeats", "timing_prompts", "steps"):
            if getattr(self, name) < 1:  # checked here, not after the hour of generation that precedes timing
                raise ValueError(f"bench {name} must be at least 1, got {getattr(self, name)}")
        # a limit of 0 would bench nothing; a negative one would silently drop prompts from the end
        counts = [("limit", self.limit), ("fit_count", self.fit_count), ("search_prompts", self.search_prompts)]
        sizes = [("height", self.height), ("width", self.width), *(("intervals", n) for n in self.intervals)]
        check_numbers([*counts, ("search_iterations", self.search_iterations), *sizes], 1)
        check_numbers([("warmup", self.warmup)], 0)
        check_numbers((("speedups", v) for v in self.speedups), 1)
        check_numbers([("guidance_scale", self.guidance_scale)])


def mean_se(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return float("nan"), float("nan")
    m = sum(finite) / len(finite)
    if len(finite) < 2:
        return m, float("nan")
    return m, statistics.stdev(finite) / math.sqrt(len(finite))


class Bench:
    """`lesa bench`: every method of `cfg` against full compute on the evaluation prompts. With `pipe`, that pipeline
    object (e.g. one the user built or modified) instead of the one `cfg.model` names; `cfg.model` then only labels
    it (default: the pipeline's `name_or_path`)."""

    def __init__(self, cfg: BenchConfig, log=print, pipe=None) -> None:
        from ..pipelines import load_pipeline, model_label

        self.cfg, self.log = cfg, log
        self.out = Path(cfg.out)
        self.prompts = read_prompts(cfg.prompts)[: cfg.limit]
        unknown = [m for m in cfg.methods if m not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
        if pipe is None:
            self.model = model_label(cfg.model)
            self.pipe = load_pipeline(cfg.model, cfg.device, cfg.dtype)
        else:
            self.model = cfg.model or getattr(pipe, "name_or_path", None) or type(pipe).__name__
            self.pipe = pipe
        self.pipe.set_progress_bar_config(disable=True)
        self.device = str(self.pipe.transformer.device)
        # the settings of every trajectory the bench generates, as `lesa record` would store them
        self.settings: dict[str, Any] = {
            "model": self.model,
            "model_class": model_class_name(self.pipe.transformer),
            "steps": cfg.steps,
            "height": cfg.height,
            "width": cfg.width,
            "guidance_scale": cfg.guidance_scale,
        }
        self.evaluated = Trajectories(self.settings, [(p, cfg.seed + i) for i, p in enumerate(self.prompts)])
        self.overlap: dict[str, Any] = {}  # results.json's `trajectory_overlap`
        blocks = [b for _, b in get_adapter(self.pipe.transformer).trunk_blocks(self.pipe.transformer)]
        self.meter = WorkMeter(self.pipe.transformer, blocks)
        self.notices: list[str] = []
        self.plot = importlib.util.find_spec("matplotlib") is not None  # the `bench` extra
        if not self.plot:
            self.notice('Pareto plot skipped: matplotlib is not installed (pip install "lesa[bench]")')
        self.flops_tables: dict[str, dict[int, int]] = {}
        self._search_reference: GenerationWork | None = None

    def notice(self, text: str) -> None:
        self.notices.append(text)
        stderr_notice(text)

    # -- generation --------------------------------------------------------------------------------------------------
    def kwargs(self) -> dict[str, Any]:
        out: dict[str, Any] = {"num_inference_steps": self.cfg.steps}
        for key in ("guidance_scale", "height", "width"):
            if getattr(self.cfg, key) is not None:
                out[key] = getattr(self.cfg, key)
        return out

    def generate(self, prompt: str, seed: int) -> np.ndarray:
        generator = torch.Generator(self.device).manual_seed(seed)
        image = self.pipe(prompt=prompt, generator=generator, output_type="pil", **self.kwargs()).images[0]
        return np.array(image.convert("RGB"))

    def run(self, method: Method | None, prompt: str, seed: int, measure: bool) -> tuple[np.ndarray, GenerationWork]:
        table = self.flops_tables.setdefault(_key(method) if method else "full", {})
        if method:
            method.enable(self.pipe)
        try:
            self.meter.start(table, measure)
            image = self.generate(prompt, seed)
            work = self.meter.stop()
        finally:
            if method:
                method.disable(self.pipe)
        return image, work

    # -- fitting data -------------------------------------------------------------------------------------------------
    def fitting(self) -> tuple[Recording | None, list[Pair]]:
        """The recording calibrated baselines are fitted on, and the fitting trajectories (prompt, seed) thresholds
        are searched on: --fit-data's recorded ones, or --fit-prompts' at `lesa record`'s seeds (prompt i: seed i).
        Evaluation trajectories among them are refused, before anything is recorded."""
        cfg = self.cfg
        if cfg.fit_data:
            rec: Recording | None = Recording(cfg.fit_data)
            fitted = Trajectories.of(rec)
            source = f"the fitting recording {cfg.fit_data}"
        elif cfg.fit_prompts:
            rec = None
            prompts = read_prompts(cfg.fit_prompts)[: cfg.fit_count]
            fitted = Trajectories(self.settings, [(p, FIT_SEED + i) for i, p in enumerate(prompts)])
            source = f"the fitting prompts {cfg.fit_prompts}"
        else:
            return None, []
        pairs = list(fitted.pairs)
        # the threshold searches generate the first fitting trajectories again, at the bench's settings
        searched = pairs[: cfg.search_prompts] if any(m in SEARCHED for m in cfg.methods) else []
        self.overlap["fitting_same_noise"] = check_disjoint(
            self.evaluated,
            [fitted, Trajectories(self.settings, searched)],
            f"evaluation prompts {cfg.prompts} (seed {cfg.seed} + i)",
            source,
            "the evaluation must not be fitted on",
            "--seed",
            self.notice,
        )
        if cfg.fit_prompts and any(m in NEEDS_FIT_DATA for m in cfg.methods):
            target = self.out / "fit-data"
            self.log(f"recording {len(pairs)} fitting trajectories into {target}")
            record(
                self.pipe,
                [p for p, _ in pairs],
                target,
                model=self.model,
                steps=cfg.steps,
                height=cfg.height,
                width=cfg.width,
                seed=FIT_SEED,
                guidance_scale=cfg.guidance_scale,
                log=self.log,
            )
            rec = Recording(target)
        return rec, pairs

    def predictor_overlap(self) -> dict[str, dict[str, int]]:
        """Per --predictor whose training_log.json lists its trajectories (`lesa train` writes them), how many
        evaluation trajectories it was trained on and selected on (held out), with a notice when any; predictors
        trained before that are not checked."""
        out = {}
        for directory in self.cfg.predictors:
            path = Path(directory) / "training_log.json"
            if not path.is_file():
                continue
            try:
                log = json.loads(path.read_text())
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} is corrupted (not valid JSON: {e})") from e
            known = log.get("training_trajectories")
            if known is None:
                continue
            trained = overlap(self.evaluated, known["keys"])[0]
            held_out = overlap(self.evaluated, known.get("held_out_keys", ()))[0]
            out[directory] = {"trained": len(trained), "held_out": len(held_out)}
            if trained or held_out:
                self.notice(
                    f"predictor {directory}: {len(trained)} of the {len(self.prompts)} evaluation trajectories are "
                    f"its training trajectories and {len(held_out)} its held-out ones (same model, sampler settings, "
                    f"prompt and seed), e.g. {describe((trained or held_out)[0])}; its rows are not scored on unseen "
                    "trajectories"
                )
        return out

    # -- methods ------------------------------------------------------------------------------------------------------
    def build_methods(self) -> list[Method]:
        cfg = self.cfg
        self.overlap["predictors"] = self.predictor_overlap()
        rec, fit_pairs = self.fitting()
        search = fit_pairs[: cfg.search_prompts]
        methods: list[Method] = []
        for budget, learned in self.budgets():
            if "lesa" in cfg.methods:
                methods += learned
            for family in cfg.methods:
                if family == "lesa":
                    continue
                if family in NEEDS_FIT_DATA and rec is None:
                    self.notice(f"{family} skipped: it is fitted on trajectories; pass --fit-data or --fit-prompts")
                    continue
                if budget.explicit and family in SAME_ON_ANY_PLACEMENT:
                    continue  # it runs on the uniform placement of this budget, which follows
                if family in SEARCHED:
                    if not search:
                        self.notice(f"{family} skipped: its threshold is searched on --fit-data/--fit-prompts prompts")
                        continue
                    methods.append(self._searched(family, budget, search))
                    continue
                indices = None if rec is None else list(range(len(rec)))
                methods += fixed_methods(family, budget, rec, indices)
        for m in methods:
            if "unmatched" in m.fitted:
                self.notice(f"{m.row}: {m.fitted['unmatched']}")
            if m.fitted:
                shown = {k: v for k, v in m.fitted.items() if k not in ("weights", "mag_ratios", "coefficients")}
                self.log(f"fitted {m.row}: {json.dumps(shown)}")
        return methods

    def budgets(self) -> list[tuple[Budget, list[Method]]]:
        """Every budget with its LESA rows: by speed-up (--speedups), or set by the predictors' schedules (with or
        without their own rows), or the --intervals."""
        cfg = self.cfg
        if cfg.speedups:
            sigmas = pipeline_sigmas(self.pipe, cfg.steps, cfg.height, cfg.width).tolist()
            return speedup_budgets(cfg.predictors, cfg.steps, cfg.speedups, cfg.warmup, sigmas)
        learned = lesa_methods(cfg.predictors, cfg.steps)
        schedules = bench_schedules(list(learned) or [(n, cfg.warmup, ()) for n in cfg.intervals])
        return [
            (Budget(StepSchedule(n, w, explicit=explicit), cfg.steps), learned.get((n, w, explicit), []))
            for n, w, explicit in schedules
        ]

    def _searched(self, family: str, budget: Budget, pairs: list[Pair]) -> Method:
        cfg = self.cfg
        if self._search_reference is None:  # the unaccelerated call pattern, the same for every search
            self._search_reference = self.run(None, *pairs[0], measure=False)[1]
        reference = self._search_reference
        num_units = self.meter.num_units

        def executions(method: Method) -> float:
            counts = []
            for prompt, seed in pairs:
                work = self.run(method, prompt, seed, measure=False)[1]
                counts.append(trunk_executions(work, reference, num_units, self.cfg.steps))
            return sum(counts) / len(counts)

        def fit_generate() -> None:
            for prompt, seed in pairs:
                self.generate(prompt, seed)

        self.log(f"searching the {family} threshold for {budget.label} on {len(pairs)} fitting prompt(s)")
        return searched_method(family, budget, self.pipe, executions, fit_generate, cfg.search_iterations)

    # -- the bench ----------------------------------------------------------------------------------------------------
    def __call__(self) -> dict[str, Any]:
        from .scoring import make_scorer

        cfg = self.cfg
        self.out.mkdir(parents=True, exist_ok=True)
        methods = self.build_methods()
        per_prompt: dict[str, list[dict[str, Any]]] = {"full": []}
        for m in methods:
            per_prompt.setdefault(_key(m), [])
        scorer = make_scorer(cfg, self.prompts, self.notice)
        total = len(self.prompts) * (len(methods) + 1)
        samples: dict[str, np.ndarray] = {}
        with tqdm(total=total, desc="bench", unit="image") as bar:
            for i, (prompt, seed) in enumerate(self.evaluated.pairs):
                reference, ref_work = self.run(None, prompt, seed, measure=i == 0)
                per_prompt["full"].append({"work": ref_work, **scorer(prompt, reference, None)})
                bar.update(1)
                for m in methods:
                    image, work = self.run(m, prompt, seed, measure=i == 0)
                    per_prompt[_key(m)].append({"work": work, **scorer(prompt, image, reference)})
                    bar.update(1)
                    if i == 0:
                        samples.setdefault(m.row, image)
                if i == 0:
                    _save_sample(self.out / "sample.png", [reference, *samples.values()])
        seconds = self.timing(methods)
        results = self.summarise(methods, per_prompt, seconds)
        atomic_write_text(self.out / "results.json", json.dumps(_clean(results), indent=1) + "\n")
        from .report import pareto_plot, results_table

        atomic_write_text(self.out / "results.md", results_table(results))
        written = [self.out / "results.json", self.out / "results.md"]
        if self.plot:
            pareto_plot(results, self.out / "pareto.png")
            written.append(self.out / "pareto.png")
        self.log(f"wrote {', '.join(map(str, written))}")
        return results

    def timing(self, methods: list[Method]) -> dict[str, list[float]]:
        """Seconds per image, methods interleaved in rotating order, `repeats` times over the first prompts."""
        cfg = self.cfg
        pairs = self.evaluated.pairs[: cfg.timing_prompts]
        entries: list[Method | None] = [None, *methods]
        seconds: dict[str, list[float]] = {"full" if m is None else _key(m): [] for m in entries}
        total = cfg.repeats * len(pairs) * len(entries)
        with tqdm(total=total, desc="timing", unit="image") as bar:
            for r in range(cfg.repeats):
                for i, (prompt, seed) in enumerate(pairs):
                    shift = (r * len(pairs) + i) % len(entries)
                    for m in entries[shift:] + entries[:shift]:
                        if m:
                            m.enable(self.pipe)
                        try:
                            start = time.perf_counter()
                            self.generate(prompt, seed)
                            elapsed = time.perf_counter() - start
                        finally:
                            if m:
                                m.disable(self.pipe)
                        seconds["full" if m is None else _key(m)].append(elapsed)
                        bar.update(1)
        return seconds

    def summarise(
        self, methods: list[Method], per_prompt: dict[str, list[dict[str, Any]]], seconds: dict[str, list[float]]
    ) -> dict[str, Any]:
        cfg = self.cfg
        steps = cfg.steps
        ref_runs = per_prompt["full"]
        num_units = self.meter.num_units
        full_flops = sum(r["work"].flops for r in ref_runs)
        full_seconds = statistics.median(seconds["full"])
        runs: dict[str, Any] = {}
        for m in [None, *methods]:
            key = "full" if m is None else _key(m)
            rows = per_prompt[key]
            execs = [
                trunk_executions(r["work"], ref["work"], num_units, steps)
                for r, ref in zip(rows, ref_runs, strict=True)
            ]
            metrics = {
                name: [r[name] for r in rows]
                for name in rows[0]
                if name != "work" and isinstance(rows[0][name], (int, float, type(None)))
            }
            runs[key] = {
                "row": "full compute" if m is None else m.row,
                "family": "none" if m is None else m.family,
                "budget": None if m is None else m.budget.label,
                "seed": None if m is None else m.seed,
                "fitted": {} if m is None else m.fitted,
                "trunk_executions": sum(execs) / len(execs),
                "flops_speedup": full_flops / max(1, sum(r["work"].flops for r in rows)),
                "flops_estimated": any(r["work"].estimated for r in rows),
                "seconds_median": statistics.median(seconds[key]),
                "wallclock_speedup": full_seconds / statistics.median(seconds[key]),
                "per_prompt": metrics,
            }
        rows_out = _rows(runs, methods)
        return {
            "command": " ".join(sys.argv),
            "config": asdict(cfg),
            "model": self.model,
            "machine": {
                "platform": platform.platform(),
                "python": platform.python_version(),
                "torch": torch.__version__,
                "device": self.device,
                "threads": torch.get_num_threads(),
            },
            "n_prompts": len(self.prompts),
            "notices": self.notices,
            "trajectory_overlap": self.overlap,
            "runs": runs,
            "rows": rows_out,
        }


def _key(m: Method) -> str:
    return m.row if m.seed is None else f"{m.row} [{m.seed}]"


QUALITY = ("psnr", "ssim", "ms_ssim", "lpips", "clip_score", "image_reward", "prompt_following")


def _rows(runs: dict[str, Any], methods: list[Method]) -> list[dict[str, Any]]:
    """One row per method: metrics averaged over seeds (per prompt), seed spread, paired difference to TaylorSeer O1."""
    grouped: dict[str, list[str]] = {"full compute": ["full"]}
    for m in methods:
        grouped.setdefault(m.row, []).append(_key(m))
    rows = []
    for row, keys in grouped.items():
        first = runs[keys[0]]
        out: dict[str, Any] = {
            "row": row,
            "family": first["family"],
            "budget": first["budget"],
            "seeds": len(keys),
            "trunk_executions": statistics.mean(runs[k]["trunk_executions"] for k in keys),
            "flops_speedup": statistics.mean(runs[k]["flops_speedup"] for k in keys),
            "wallclock_speedup": statistics.mean(runs[k]["wallclock_speedup"] for k in keys),
            "fitted": first["fitted"],
        }
        for metric in QUALITY:
            series = [runs[k]["per_prompt"].get(metric) for k in keys]
            if any(s is None or any(v is None for v in s) for s in series):
                continue
            per_prompt = [statistics.mean(vals) for vals in zip(*series, strict=True)]
            out[metric] = mean_se(per_prompt)
            if len(keys) > 1:
                out[f"{metric}_seed_spread"] = statistics.stdev(mean_se(s)[0] for s in series)
            out[f"_{metric}_per_prompt"] = per_prompt
        rows.append(out)
    # paired differences against TaylorSeer O1 at the same budget
    baseline = {r["budget"]: r for r in rows if r["family"] == "taylorseer-o1"}
    for r in rows:
        base = baseline.get(r["budget"])
        if base is None or r is base:
            continue
        for metric in ("psnr", "ssim"):
            a, b = r.get(f"_{metric}_per_prompt"), base.get(f"_{metric}_per_prompt")
            if a and b:
                r[f"{metric}_vs_taylorseer_o1"] = mean_se([x - y for x, y in zip(a, b, strict=True)])
    return rows


def _save_sample(path: Path, images: list[np.ndarray]) -> None:
    """The first prompt's images side by side: full compute, then every method (first seed of each row)."""
    from PIL import Image

    strip = np.concatenate(images, axis=1)
    scale = max(1, 128 // strip.shape[0])
    image = Image.fromarray(strip).resize((strip.shape[1] * scale, strip.shape[0] * scale), Image.NEAREST)
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def _clean(value: Any) -> Any:
    """JSON-safe: infinite or NaN floats become strings ("inf"), tuples lists, paths strings."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def bench_pipeline(pipe, prompts: str | Path, out: str | Path, **options: Any) -> dict[str, Any]:
    """Bench a pipeline object as `lesa bench` benches a named model: `options` are `BenchConfig`'s fields (methods,
    predictors, steps, intervals, seed, ...). Writes results.json / results.md (and pareto.png) into `out` and
    returns the results.

    ```python
    from lesa.evaluate import bench_pipeline

    results = bench_pipeline(pipe, "prompts.txt", "runs/bench", methods=["fora", "lesa"], predictors=["runs/pred"])
    ```
    """
    return Bench(BenchConfig(prompts=str(prompts), out=str(out), **options), pipe=pipe)()
