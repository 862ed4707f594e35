"""The closed-loop scorer: run the real pipeline from recorded noise with any cache configuration and compare the final
latent with the recording. Training selects on it; `lesa bench`'s fits and the benchmark scripts score with it."""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from .. import disable, distributed, enable
from ..config import CacheConfig, LESAConfig
from ..pipelines import call_kwargs, pipeline_output
from ..policies import ReusePolicy, TaylorSeerPolicy
from ..predictor import LESAPredictor
from ..recording import Recording
from ..runtime import StepEvent, get_runtime
from .data import TrainingData, minibatches


def latent_psnr(pred: torch.Tensor, ref: torch.Tensor) -> float:
    """PSNR of a final latent against the full-compute latent, peak = the reference's range."""
    mse = float(((pred.float() - ref.float()) ** 2).mean())
    peak = float(ref.max() - ref.min())
    return float("inf") if mse == 0 else 10 * math.log10(peak**2 / mse)


def as_call_batch(per_prompt: torch.Tensor, dims: int) -> torch.Tensor:
    """Recorded tensors of a batch of prompts, (prompt, ...), laid out as the transformer call's batch: a pipeline
    that batches classifier-free guidance (recorded per prompt as (chunk, ...)) calls the transformer with the
    chunks of all prompts in turn, [uncond x B, cond x B]."""
    if per_prompt.dim() == dims + 1:
        return per_prompt.transpose(0, 1).flatten(0, 1)
    return per_prompt


class Scorer:
    """Runs `pipe` on recorded trajectories (prompts and initial noise of `data`) and scores final latents.

    Under torchrun each rank runs its share of the trajectories and the means are reduced over ranks.

    Example:
        >>> scorer = Scorer.for_recording(recording)  # doctest: +SKIP
        >>> scorer.score(lesa.FORAConfig(interval=7, count_flops=False))  # doctest: +SKIP
        {'mse': ..., 'psnr': ...}
    """

    def __init__(self, pipe: Any, data: TrainingData, batch_size: int = 8) -> None:
        self.pipe = pipe
        self.data = data
        self.batch_size = batch_size
        self.dist = distributed.current()
        self.device = pipe.transformer.device
        self.dtype = pipe.transformer.dtype
        self._baselines: dict[str, dict[str, float]] = {}

    @classmethod
    def for_recording(cls, recording: Recording, val_fraction: float = 0.2, pipe: Any = None) -> Scorer:
        """A scorer on `lesa train`'s held-out split of `recording`; without `pipe`, the recording's model on the
        CPU."""
        if pipe is None:
            from ..pipelines import load_pipeline

            pipe = load_pipeline(recording.settings["model"], "cpu")
            pipe.set_progress_bar_config(disable=True)
        return cls(pipe, TrainingData.split(recording, val_fraction))

    def share(self, batch: list[int]) -> list[int]:
        """This rank's part of a minibatch (the whole minibatch in one process)."""
        return batch[self.dist.rank :: self.dist.world_size]

    def run(self, batch: list[int], data: list[dict[str, torch.Tensor]], grad: bool = False) -> torch.Tensor:
        """The pipeline on these trajectories' prompts and noise; `grad`: with autograd through the whole sampler
        (diffusers pipelines run `__call__` under no_grad, so its undecorated function is called)."""
        prompts = [self.data.prompt(i) for i in batch]
        noise = torch.stack([d["noise"] for d in data]).to(self.device, self.dtype)
        kwargs = call_kwargs(self.data.settings, self.pipe)
        if isinstance(kwargs.get("negative_prompt"), str):  # one negative prompt per prompt of the batch
            kwargs["negative_prompt"] = [kwargs["negative_prompt"]] * len(prompts)
        if not grad:
            return pipeline_output(self.pipe(prompt=prompts, latents=noise, **kwargs))
        with torch.enable_grad():
            call = inspect.unwrap(type(self.pipe).__call__)
            return pipeline_output(call(self.pipe, prompt=prompts, latents=noise, **kwargs))

    @contextlib.contextmanager
    def latents_at(self, steps: Sequence[int], rows: int) -> Iterator[dict[int, torch.Tensor]]:
        """Within: the latent entering each of `steps` in the pipeline's calls, by step (its first `rows` rows, one
        per prompt: a pipeline that batches guidance repeats them), with its autograd graph."""
        latents: dict[int, torch.Tensor] = {}

        def grab(event: StepEvent) -> None:  # the first context's call of a step: every context gets these latents
            if event.step in steps and event.step not in latents:
                latents[event.step] = event.latents[:rows]

        observers = get_runtime(self.pipe.transformer).observers
        observers.append(grab)
        try:
            yield latents
        finally:
            observers.remove(grab)

    @torch.no_grad()
    def rollouts(
        self, config: CacheConfig, indices: list[int], steps: Sequence[int] = ()
    ) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor, dict[int, torch.Tensor]]]:
        """The pipeline run with `config` on these trajectories, in the order of `indices`: per trajectory its
        recording, its final latent and the latent entering each of `steps` (fp32, on the CPU)."""
        enable(self.pipe, config)
        try:
            for batch in minibatches(indices, self.batch_size):
                data = [self.data.load(i) for i in batch]
                with self.latents_at(steps, len(batch)) as latents:
                    final = self.run(batch, data).float().cpu()
                for row, d in enumerate(data):
                    yield d, final[row], {s: x[row].float().cpu() for s, x in latents.items()}
        finally:
            disable(self.pipe)

    def trajectory_errors(self, config: CacheConfig, indices: list[int]) -> list[tuple[float, float]]:
        """(MSE, PSNR) of each trajectory's final latent against the recording, running the pipeline with `config`,
        in the order of `indices` (this process's trajectories only: no reduction across ranks)."""
        return [
            (float(((out - d["final"]) ** 2).mean()), latent_psnr(out, d["final"]))
            for d, out, _ in self.rollouts(config, indices)
        ]

    def score(self, config: CacheConfig, indices: list[int] | None = None) -> dict[str, float]:
        """Mean MSE and PSNR of the final latent against the recording (default: on the held-out trajectories),
        running the pipeline with `config` (each rank runs its share; the means are over all and equal on every
        rank)."""
        indices = self.data.val_idx if indices is None else indices
        sums = torch.zeros(3, dtype=torch.float64)  # MSE, PSNR, count
        for mse, psnr in self.trajectory_errors(config, self.share(indices)):
            sums += torch.tensor([mse, psnr, 1.0])
        mse, psnr, n = distributed.all_reduce_sum(sums).tolist()
        return {"mse": mse / n, "psnr": psnr / n}

    def baseline(self, config: CacheConfig) -> dict[str, float]:
        """`score` on the held-out split of a fixed (untrained) method, computed once per configuration: the start
        of a predictor and the training log's baselines score the same ones."""
        key = repr(config)  # the whole configuration, schedule included
        if key not in self._baselines:
            self._baselines[key] = self.score(config)
        return self._baselines[key]

    def score_predictor(self, predictor: LESAPredictor, **options: Any) -> dict[str, float]:
        """`score` of a predictor on its own schedule (`options`: further LESAConfig fields)."""
        return self.score(LESAConfig(predictor=predictor, count_flops=False, **options))


def one_step_errors(predictor: LESAPredictor, rec: Recording, indices: list[int]) -> dict[str, float]:
    """Teacher-forced one-step error (mean absolute error on the tap) at the schedule's cached steps, on recorded
    trajectories: the predictor from the recorded history, FORA and TaylorSeer O1 (their policies) fed the recorded
    full steps."""
    pc = predictor.config
    schedule = pc.schedule()
    cached = set(schedule.cached_steps(pc.num_steps))
    sigmas = torch.tensor(pc.sigmas, dtype=torch.float32)
    device = next(predictor.parameters()).device
    sums = {"lesa": 0.0, "fora": 0.0, "taylorseer_o1": 0.0}
    count = 0
    with torch.no_grad():
        for i in indices:
            data = rec.load(i)
            for ctx in rec.contexts:
                feats = data[f"{ctx}.feature"].to(device, torch.float32)
                policies = {"fora": ReusePolicy(), "taylorseer_o1": TaylorSeerPolicy(order=1)}
                for policy in policies.values():
                    policy.begin(sigmas)
                for s in range(pc.num_steps):
                    if s not in cached:
                        for policy in policies.values():
                            policy.observe(feats[s], s, float(sigmas[s]))
                        continue
                    past = [feats[j] for j in predictor.past_steps(s)]
                    guesses = {name: policy.forecast(s, float(sigmas[s])) for name, policy in policies.items()}
                    guesses["lesa"] = predictor.forecast(past, ctx, s, sigmas)
                    for name, guess in guesses.items():
                        sums[name] += float((guess - feats[s]).abs().mean())
                    count += 1
    return {name: total / count for name, total in sums.items()}
