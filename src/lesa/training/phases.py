"""The training phases of one variant: `gt` (teacher forcing on recorded features), `clar` (closed loop through the
real sampler, per-step, per-cycle or final-latent loss) and the update step they share.

Under torchrun each minibatch (the global batch) is split across ranks and gradients are summed over ranks before
every update (phase gt through DistributedDataParallel, phase clar through an explicit all-reduce after backward), so
an update equals the single-process update on the whole minibatch up to float reduction order.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm.auto import tqdm

from .. import disable, distributed, enable
from ..config import LESAConfig
from ..predictor import LESAPredictor
from ..runtime import StepEvent, get_runtime
from ..schedule import StepSchedule, truncation_step
from .config import TrainConfig
from .data import TrainingData, minibatches
from .placement import Variant
from .start import Start, new_predictor
from .validation import Scorer, as_call_batch


def cosine_lr(peak: float, floor: float, t: int, total: int) -> float:
    if total <= 1:
        return peak
    return floor + 0.5 * (peak - floor) * (1 + math.cos(math.pi * min(t, total) / total))


@contextlib.contextmanager
def frozen_pipeline(pipe: Any) -> Iterator[None]:
    """Within: every parameter of the pipeline's modules (transformer, text encoders, VAE, any other nn.Module
    component) frozen, their requires_grad flags restored after. The closed loop trains the predictor alone: a text
    encoder left trainable under loss "final" would get a gradient of every weight (~9.8 GB on FLUX.1-dev) and
    autograd would keep its activations; frozen, it runs as without gradients."""
    components = getattr(pipe, "components", {})
    modules = [m for m in (pipe.transformer, *components.values()) if isinstance(m, torch.nn.Module)]
    flags = [(p, p.requires_grad) for m in modules for p in m.parameters()]  # a shared module: twice, same flag
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def param_groups(predictor: torch.nn.Module, peak: float, config: TrainConfig) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: the learned correction (if any) at its own peak learning rate."""
    correction = [predictor.correction] if predictor.config.correction else []
    rest = [p for p in predictor.parameters() if all(p is not c for c in correction)]
    groups: list[dict[str, Any]] = [{"params": rest, "lr": peak}]
    if correction:
        groups.append({"params": correction, "lr": config.lr_correction, "peak": config.lr_correction})
    return groups


def apply_update(
    predictor: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    loss_sum: torch.Tensor | Iterable[torch.Tensor] | None,
    count: int,
    peak: float,
    total: int,
    config: TrainConfig,
    ddp: bool = False,
) -> float:
    """One update from this rank's summed loss `loss_sum` (L1 error, or log MSE with loss "final"; None: this rank
    has no data in the minibatch) over a minibatch of `count` elements (trajectories with loss "final") on all
    ranks together, with the run settings `config`. Returns the minibatch's mean loss (equal on all ranks).

    `loss_sum` may also be an iterable of the summed losses of the share's micro-batches: each is back-propagated
    as it comes (a generator rolls the next one out only then, so one micro-batch's graph is alive at a time) and
    their gradients add up to the whole share's. Gradients are summed over ranks: with `ddp` by
    DistributedDataParallel during backward (it averages, so the loss carries the world size), otherwise by an
    explicit all-reduce after backward.
    """
    cfg = config
    dist = distributed.current()
    scale = (dist.world_size if ddp else 1) / count
    optimizer.zero_grad(set_to_none=True)
    local = torch.zeros(1, dtype=torch.float64)
    for part in [loss_sum] if isinstance(loss_sum, torch.Tensor) else loss_sum or ():
        local += part.detach().double().reshape(1).cpu()
        (part * scale).backward()
    value = float(distributed.all_reduce_sum(local)[0]) / count
    if not math.isfinite(value):  # divergence guard: never let a NaN update reach the weights (all ranks agree)
        state["skipped"] = state.get("skipped", 0) + 1
        optimizer.zero_grad(set_to_none=True)  # after the backward DDP expects of its forward
        return value
    for group in optimizer.param_groups:
        group["lr"] = cosine_lr(group.get("peak", peak), cfg.lr_min, state["t"], total)
    if not ddp:
        distributed.all_reduce_gradients(predictor)
    torch.nn.utils.clip_grad_norm_(predictor.parameters(), cfg.grad_clip)
    optimizer.step()
    if cfg.anchor > 0:
        with torch.no_grad():
            for p, start in zip(predictor.parameters(), state["anchor"], strict=True):
                p.lerp_(start, min(1.0, optimizer.param_groups[0]["lr"] * cfg.anchor))
    state["t"] += 1
    return value


@dataclass
class Phases:
    """Trains predictors of one variant: everything the phases read, as values.

    Example (what `Trainer.run` does per seed and phase, without checkpoints):
        >>> phases = trainer.phases()  # doctest: +SKIP
        >>> predictor = phases.new_predictor(seed=0)  # doctest: +SKIP
        >>> optimizer = torch.optim.AdamW(phases.param_groups(predictor, phases.config.lr_clar))  # doctest: +SKIP
        >>> total = phases.updates_per_epoch("clar")  # doctest: +SKIP
        >>> phases.clar_epoch(predictor, optimizer, {"t": 0}, 1, total, "clar 1")  # doctest: +SKIP
    """

    pipe: Any
    data: TrainingData
    scorer: Scorer
    variant: Variant
    config: TrainConfig  # the run's, with the variant's correction
    schedule: StepSchedule  # the variant's placement
    windows: tuple[int, ...]
    start: Start
    progress: bool = False

    @property
    def num_steps(self) -> int:
        return self.data.num_steps

    @property
    def cached_steps(self) -> list[int]:
        return self.schedule.cached_steps(self.num_steps)

    @property
    def dist(self) -> distributed.DistInfo:
        return self.scorer.dist

    def new_predictor(self, seed: int) -> LESAPredictor:
        return new_predictor(
            self.config,
            self.data,
            self.schedule,
            self.windows,
            self.start,
            seed,
            self.scorer.device,
            self.scorer.dtype,
        )

    def cycle_ends(self) -> list[int]:
        """The full steps after the warm-up: each closes a cache cycle, and the latent entering it ends that cycle."""
        return [s for s in self.schedule.full_steps(self.num_steps) if s > self.config.warmup]

    def updates_per_rollout(self, phase: str) -> int:
        """Updates per minibatch: one per cached step and context, or with the cycle loss of phase clar one per cache
        cycle (run of cached steps) and context; one with loss "final"."""
        if phase == "clar" and self.config.loss == "final":
            return 1
        if phase == "clar" and self.config.loss == "cycle":
            steps = [s for s in self.cached_steps if s - 1 not in self.cached_steps]
        else:
            steps = self.cached_steps
        return len(steps) * len(self.data.contexts)

    def updates_per_epoch(self, phase: str) -> int:
        return math.ceil(len(self.data.train_idx) / self.config.batch_size) * self.updates_per_rollout(phase)

    def param_groups(self, predictor: LESAPredictor, peak: float) -> list[dict[str, Any]]:
        return param_groups(predictor, peak, self.config)

    def update(
        self,
        predictor: LESAPredictor,
        optimizer: torch.optim.Optimizer,
        state: dict,
        loss_sum: torch.Tensor | Iterable[torch.Tensor] | None,
        count: int,
        peak: float,
        total: int,
        ddp: bool = False,
    ) -> float:
        """`apply_update` with this variant's settings."""
        return apply_update(predictor, optimizer, state, loss_sum, count, peak, total, self.config, ddp)

    def _stack(self, data: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
        """(steps, batch, ...) float32 on the device; an empty batch gives a zero-size tensor of the right shape."""
        if not data:
            steps, *shape = self.data.rec.shapes[key]
            return torch.zeros((steps, 0, *shape), device=self.scorer.device)
        return torch.stack([d[key] for d in data], 1).to(self.scorer.device, torch.float32)

    def _batches(self, epoch_seed: int) -> list[list[int]]:
        return minibatches(self.data.train_idx, self.config.batch_size, epoch_seed)

    def gt_epoch(self, predictor, optimizer, state, epoch_seed: int, total: int, desc: str) -> float:
        """Teacher forcing: the history always holds recorded features; no transformer call."""
        losses = []
        ddp = self.dist.distributed
        # every forecast uses one expert of one context: the other parameters get no gradient in that update
        model = (
            DistributedDataParallel(predictor, find_unused_parameters=True, forward_sync_buffers=False)
            if ddp
            else predictor
        )
        sigmas = self.data.sigmas()
        for batch in tqdm(self._batches(epoch_seed), desc=desc, disable=not self.progress, leave=False):
            data = [self.data.rec.load(i) for i in self.scorer.share(batch)]
            for ctx in self.data.contexts:
                key = f"{ctx}.feature"
                feats = self._stack(data, key)
                count = len(batch) * self.data.elements(key)
                for s in self.cached_steps:
                    past = [feats[j] for j in predictor.past_steps(s)]
                    pred = model(past, ctx, s, sigmas)
                    loss_sum = (pred - feats[s]).abs().sum()
                    peak = self.config.lr_gt
                    losses.append(self.update(predictor, optimizer, state, loss_sum, count, peak, total, ddp))
        return sum(losses) / len(losses)

    def clar_epoch(self, predictor, optimizer, state, epoch_seed: int, total: int, desc: str) -> float:
        """Closed loop: the real sampler from the recorded noise; forecasts feed back; loss vs the recording.

        Each rank rolls out its share of the minibatch; a rank with no share still takes part in every update."""
        cfg, rec = self.config, self.data.rec
        losses: list[float] = []
        targets: dict[str, torch.Tensor] = {}
        key = "feature" if cfg.target == "feature" else "output"
        batch_size = 0

        # loss "cycle": per context, the dt-weighted error summed over the cached steps since the last full step
        pending: dict[str, tuple[torch.Tensor, float]] = {}
        sigmas = self.data.sigmas()
        step_sizes = (sigmas[:-1] - sigmas[1:]).abs().tolist()

        def update(context: str, loss_sum: torch.Tensor) -> None:
            count = batch_size * self.data.elements(f"{context}.{key}")
            losses.append(self.update(predictor, optimizer, state, loss_sum, count, cfg.lr_clar, total))

        def flush(context: str) -> None:
            if context in pending:
                error, weight = pending.pop(context)
                with torch.enable_grad():  # a full step's event comes inside the pipeline's no_grad
                    update(context, (error / weight).abs().sum())

        def observer(event: StepEvent) -> None:
            if event.full:
                flush(event.context)
                return
            pred = event.tap if key == "feature" else event.output
            target = as_call_batch(targets[event.context][event.step], pred.dim()).to(pred.device)
            if cfg.loss == "step":
                update(event.context, (pred.float() - target).abs().sum())
            else:
                error, weight = pending.get(event.context, (0.0, 0.0))
                w = step_sizes[event.step]
                pending[event.context] = (error + w * (pred.float() - target), weight + w)

        final = cfg.loss == "final"  # one loss on the rollout's result: no per-step observer, no targets
        config = LESAConfig(
            predictor=predictor,
            differentiable=True,
            history_grad=cfg.history_grad,
            checkpoint_trunk=cfg.checkpoint_trunk,
            checkpoint_calls=cfg.checkpoint_calls,
            grad_from_step=truncation_step(
                self.schedule.full_steps(self.num_steps), self.num_steps, cfg.truncate_cycles if final else None
            ),
            count_flops=False,
        )
        updates = self.updates_per_rollout("clar")
        with frozen_pipeline(self.pipe):
            enable(self.pipe, config)
            try:
                if not final:
                    get_runtime(self.pipe.transformer).observers.append(observer)
                for batch in tqdm(self._batches(epoch_seed), desc=desc, disable=not self.progress, leave=False):
                    share = self.scorer.share(batch)
                    batch_size = len(batch)
                    before = len(losses)
                    if share and final:  # one micro-batch rolled out (and its graph alive) at a time
                        parts = (
                            self.final_loss(part, [rec.load(i) for i in part])
                            for part in minibatches(share, cfg.micro_batch or len(share))
                        )
                        losses.append(self.update(predictor, optimizer, state, parts, batch_size, cfg.lr_clar, total))
                    elif share:
                        data = [rec.load(i) for i in share]
                        for ctx in rec.contexts:
                            targets[ctx] = torch.stack([d[f"{ctx}.{key}"] for d in data], 1).float()
                        self.scorer.run(share, data)
                        for ctx in list(pending):
                            flush(ctx)
                    else:  # nothing to roll out here: join the other ranks' gradient sums with no contribution
                        count = batch_size * self.data.elements(f"{rec.contexts[0]}.{key}")  # scales the logged loss
                        for _ in range(updates):
                            losses.append(self.update(predictor, optimizer, state, None, count, cfg.lr_clar, total))
                    if share and len(losses) - before != updates:
                        raise RuntimeError(
                            f"a closed-loop rollout made {len(losses) - before} updates, expected {updates} "
                            f"(loss {cfg.loss!r}, {len(rec.contexts)} contexts)"
                        )
            finally:
                disable(self.pipe)
        return sum(losses) / max(len(losses), 1)

    def final_loss(self, batch: list[int], data: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Loss "final": the summed log MSE of these trajectories' final latents against the recording, with
        gradients through the whole sampler (the pipeline must run a differentiable LESAConfig). Its mean over
        trajectories is the held-out score, mean PSNR, up to sign and scale. The features in the predictor's history
        stay detached unless `history_grad`: a forecast then reaches the loss through the latents and every later
        step, not through later forecasts (the exact gradient, `history_grad`, trains stably only at a low learning
        rate: docs/history/2026-12-benchmarks-notebook.md). With `loss_cycles`, the same term of the latents at the end
        of the first cache cycles is added."""

        return closed_loop_loss(self.scorer, batch, data, self.cycle_ends()[: self.config.loss_cycles])


def closed_loop_loss(
    scorer: Scorer, batch: list[int], data: list[dict[str, torch.Tensor]], cycle_ends: list[int]
) -> torch.Tensor:
    """The summed log MSE of these trajectories' final latents against the recording, plus that of the latents
    entering each of `cycle_ends`, with gradients through the whole sampler (the pipeline must run a differentiable
    LESAConfig)."""

    def log_mse(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        return ((x.float() - ref.to(x.device, torch.float32)) ** 2).flatten(1).mean(1).log().sum()

    with scorer.latents_at(cycle_ends, len(batch)) as latents:
        loss = log_mse(scorer.run(batch, data, grad=True), torch.stack([d["final"] for d in data]))
    for step in cycle_ends:
        # a latent no forecast reached yet (a cycle with no cached step, or one before a truncation) is a constant:
        # left out, as its log error can be -inf (the sampler reproducing the recording exactly at batch size 1)
        if latents[step].requires_grad:
            loss = loss + log_mse(latents[step], torch.stack([d["latents"][step] for d in data]))
    return loss
