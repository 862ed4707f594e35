"""How much a gain fed with statistics of the recent history could add to a trained predictor (issue 7, lever 3).

Such a gain scales each cached step's forecast increment D = forecast - h[-1] by a factor computed from the features
already in the history. Everything here reads the predictor-training recording only (never the evaluation prompts),
with `lesa train`'s own train / held-out split.

Open loop, on the tapped feature (training split): the predictor's feature error against the least-squares best of
- a per-step factor (one per step and context, as a step-conditioned gain has),
- a per-image factor (one per step, context and image: the ceiling of any gain fed with per-image statistics),
- a per-token factor (the ceiling of a per-token gain),
- a per-step factor plus itself times a linear function of three per-image statistics of the last full-step features
  (log of the norm ratio of the last two differences, their cosine, log of the last difference's norm relative to
  the feature), this and the per-step factor alone fitted on half of the trajectories and scored on the other half.

Closed loop, on the final latent (held-out split, `lesa train`'s score): per-image PSNR with every increment scaled
by one factor from a sweep, the per-image best of the sweep (an oracle that looks at the reference), how many images
jump by more than 6 dB between neighbouring factors, the predictor with the open-loop per-step factors applied, and,
with only one segment of the schedule scaled at a time, how many images move (where the jumps are decided).

    python benchmarks/gain_ceiling.py src/lesa/embedded/predictors/n7 --data runs/rec-embedded
"""

from __future__ import annotations

import math
import types

import torch
from harness import comma_list, held_out_scorer, make_parser, parse
from tqdm.auto import tqdm

from lesa.config import LESAConfig
from lesa.predictor import LESAPredictor
from lesa.recording import Recording
from lesa.training import Scorer


def increments(predictor: LESAPredictor, feats: torch.Tensor, context: str, sigmas: list[float]):
    """Per cached step with three full-step features in the history: (step, D, E, history), D the forecast
    increment and E the recorded feature minus the last full-step feature (the increment a perfect forecast has)."""
    table = predictor.coefficient_table(context, sigmas)
    for step in range(predictor.config.num_steps):
        past = [f for f in predictor.full_steps if f < step][-3:]
        if step in predictor.full_steps or len(past) < 3:
            continue
        history = [feats[f] for f in past]
        coeffs, offset = table[step]
        forecast = LESAPredictor.apply_coefficients([h.clone() for h in history], coeffs, offset)
        yield step, forecast - history[-1], feats[step] - history[-1], history


def statistics(history: list[torch.Tensor]) -> list[float]:
    d0, d1 = history[-1] - history[-2], history[-2] - history[-3]
    n0, n1 = d0.norm().clamp_min(1e-12), d1.norm().clamp_min(1e-12)
    return [math.log(n0 / n1), float((d0 * d1).sum() / (n0 * n1)), math.log(n0 / history[-1].norm().clamp_min(1e-12))]


def db(base: float, err: float) -> str:
    return f"{10 * math.log10(base / err):+.2f} dB"


def open_loop(predictor: LESAPredictor, rec: Recording, indices: list[int]) -> dict[tuple[str, int], float]:
    """Print the open-loop comparison; return the per-step least-squares factors (context, step) -> factor."""
    rows, token_error = [], 0.0
    for n, i in enumerate(tqdm(indices, desc="open loop")):
        shard = rec.load(i)
        for c, context in enumerate(rec.contexts):
            for step, d, e, history in increments(predictor, shard[f"{context}.feature"].float(), context, rec.sigmas):
                de, dd = (d * e).sum(-1), (d * d).sum(-1).clamp_min(1e-12)
                token_error += float(((e * e).sum(-1) - de**2 / dd).sum())
                rows.append([n, c, step, float(de.sum()), float(dd.sum()), float((e * e).sum()), *statistics(history)])
    r = torch.tensor(rows, dtype=torch.float64)
    de, dd, ee = r[:, 3], r[:, 4], r[:, 5]

    def error(gain: torch.Tensor, mask: torch.Tensor) -> float:
        return float((ee - 2 * gain * de + gain**2 * dd)[mask].sum())

    def fit(design: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # least squares of sum dd * (g - de/dd)^2, the feature error up to a constant; gelsd copes with empty columns
        a, b = design[mask] * dd[mask].sqrt()[:, None], (de / dd.sqrt())[mask]
        return design @ torch.linalg.lstsq(a, b[:, None], driver="gelsd").solution.squeeze(1)

    cell = (r[:, 2] * len(rec.contexts) + r[:, 1]).long()
    per_step = torch.nn.functional.one_hot(cell).double()
    stats = r[:, 6:9]
    stats = (stats - stats.mean(0)) / stats.std(0)
    every, first = torch.ones_like(de, dtype=torch.bool), r[:, 0] < len(indices) // 2
    step_gain, step_first = fit(per_step, every), fit(per_step, first)
    with_stats = fit(torch.cat([per_step, stats * step_first[:, None]], 1), first)
    one = torch.ones_like(de)
    base, base_second = error(one, every), error(one, ~first)
    print(f"open loop, {len(indices)} training trajectories, {len(rows)} (image, context, cached step) cells;")
    print("feature error relative to the predictor's (positive: lower):")
    print(f"  reuse (D = 0)                         {db(base, float(ee.sum()))}")
    print(f"  per-step factor                       {db(base, error(step_gain, every))}")
    print(f"  per-image factor                      {db(base, float((ee - de**2 / dd).sum()))}")
    print(f"  per-token factor                      {db(base, token_error)}")
    print(f"  per-step factor, fitted on half       {db(base_second, error(step_first, ~first))}")
    print(f"  the same plus statistics              {db(base_second, error(with_stats, ~first))}")
    return {(rec.contexts[int(c)], int(s)): float(g) for c, s, g in zip(r[:, 1], r[:, 2], step_gain, strict=True)}


def scale_increments(predictor: LESAPredictor, factor) -> None:
    """Make the predictor forecast h[-1] + factor(context, step) * D (its folded table scaled in place)."""
    unscaled = type(predictor)._coefficient_table

    def table(self, context, sigmas):
        rows = unscaled(self, context, sigmas)
        return [([factor(context, s) * c for c in cs], factor(context, s) * c0) for s, (cs, c0) in enumerate(rows)]

    predictor._coefficient_table = types.MethodType(table, predictor)
    predictor.__dict__.pop("_tables", None)


def held_out_psnr(scorer: Scorer, predictor: LESAPredictor) -> torch.Tensor:
    """Per-image final-latent PSNR on the held-out split (what `lesa train` averages)."""
    errors = scorer.trajectory_errors(LESAConfig(predictor=predictor, count_flops=False), scorer.data.val_idx)
    return torch.tensor([psnr for _mse, psnr in errors])


def main() -> None:
    parser = make_parser(__doc__, data="the `lesa record` directory it was trained on")
    parser.add_argument("predictor", help="a trained predictor directory with memory 'full'")
    parser.add_argument("--limit", type=int, default=40, help="training trajectories read open loop")
    parser.add_argument("--factors", default="0.85,0.9,0.95,1,1.05,1.1,1.15", help="the closed-loop sweep")
    parser.add_argument(
        "--segments", default="17,31", help="steps that split the schedule into segments scaled one at a time"
    )
    args = parse(parser, threads=1)
    predictor = LESAPredictor.from_pretrained(args.predictor)
    if predictor.config.memory != "full":
        raise ValueError(f"{args.predictor}: this analysis needs memory 'full' (a history of recorded features)")
    scorer = held_out_scorer(args.data)
    step_factors = open_loop(predictor, scorer.data.rec, scorer.data.train_idx[: args.limit])

    factors = comma_list(args.factors, float)
    sweep = []
    for f in tqdm(factors, desc="closed loop"):
        scale_increments(predictor, lambda _c, _s, f=f: f)
        sweep.append(held_out_psnr(scorer, predictor))
    scale_increments(predictor, lambda c, s: step_factors.get((c, s), 1.0))
    feature_optimal = held_out_psnr(scorer, predictor)
    table = torch.stack(sweep, 1)  # images x factors
    jumps = (table.diff(dim=1).abs() > 6).any(1)
    print(f"closed loop, {len(scorer.data.val_idx)} held-out trajectories, final-latent PSNR (dB):")
    print("  factor " + " ".join(f"{f:6.2f}" for f in factors))
    print("  mean   " + " ".join(f"{v:6.2f}" for v in table.mean(0).tolist()))
    for i, row in enumerate(table.tolist()):
        print(f"  img {i:2d} " + " ".join(f"{v:6.1f}" for v in row) + ("  <- jumps" if jumps[i] else ""))
    print(
        f"  per-image best factor (oracle): {table.max(1).values.mean():.2f}; best single factor: "
        f"{table.mean(0).max():.2f}; images jumping > 6 dB between neighbouring factors: {int(jumps.sum())}"
    )
    print(f"  open-loop per-step factors applied: {feature_optimal.mean():.2f}")

    # where the jumps are decided: one segment of the schedule scaled at a time, the rest as trained
    if 1.0 in factors:
        base = table[:, factors.index(1.0)]
    else:
        scale_increments(predictor, lambda _c, _s: 1.0)
        base = held_out_psnr(scorer, predictor)
    edges = [0, *comma_list(args.segments, int), predictor.config.num_steps]
    print("  one segment scaled at a time: mean PSNR; images moved by more than 6 dB / more than 1 dB")
    for lo, hi in zip(edges, edges[1:], strict=False):
        cells = []
        for f in [f for f in factors if f != 1.0]:
            scale_increments(predictor, lambda _c, s, f=f, lo=lo, hi=hi: f if lo <= s < hi else 1.0)
            psnr = held_out_psnr(scorer, predictor)
            moved = (psnr - base).abs()
            cells.append(f"f {f:.2f}: {psnr.mean():.2f}; {int((moved > 6).sum())} / {int((moved > 1).sum())}")
        print(f"  steps {lo}-{hi - 1}: " + ", ".join(cells))


if __name__ == "__main__":
    main()
