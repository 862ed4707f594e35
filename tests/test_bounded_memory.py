"""The closed loop's memory (issue 33): a frozen pipeline, gradient checkpointing of the trunk, micro-batches."""

from __future__ import annotations

import inspect
import weakref

import pytest
import torch
from test_record_train import QUICK_CALIBRATED, QUIET
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lesa
from lesa.cli import _parser, _train_config
from lesa.runtime import get_runtime
from lesa.schedule import truncation_step
from lesa.training import TrainConfig, Trainer
from lesa.training.phases import closed_loop_loss, frozen_pipeline

# the calibrated recipe's gradient at test size: the exact gradient, an early-cycle term and a learned correction
CALIBRATED = dict(QUICK_CALIBRATED, history_grad=True, loss_cycles=1, correction=True)


class LiveTensorBytes(TorchDispatchMode):
    """Within: the bytes of the tensor storages that ops create and that are still alive (`now`), and their `peak`.

    Each storage counts once, from the op that creates it until it is freed; views and in-place results of an op's
    inputs are not new memory. Deterministic on the CPU (unlike the process's resident memory); what existed before
    (weights, recorded data) is not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0

    def _freed(self, key: int) -> None:
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key and key not in inputs and key not in self.live:
                self.live[key] = storage.nbytes()
                self.now += storage.nbytes()
                weakref.finalize(storage, self._freed, key)
        self.peak = max(self.peak, self.now)
        return out


def component_flags(pipe) -> dict[str, list[bool]]:
    return {
        name: [p.requires_grad for p in module.parameters()]
        for name, module in pipe.components.items()
        if isinstance(module, torch.nn.Module)
    }


def one_epoch(
    pipe, recording, out, optimizer: type[torch.optim.Optimizer] = torch.optim.AdamW, **settings
) -> tuple[Trainer, torch.nn.Module, float]:
    """A new predictor after one closed-loop epoch (calibrated settings plus `settings`, `optimizer` as `lesa train`
    sets it up): trainer, predictor, the epoch's mean loss."""
    config = TrainConfig(**{**CALIBRATED, **settings}, epochs_clar=1)
    trainer = Trainer(recording, pipe, out, config, **QUIET)
    phases = trainer.phases()
    predictor = phases.new_predictor(0)
    groups = phases.param_groups(predictor, config.lr_clar)
    optimizer = optimizer(groups, lr=config.lr_clar, weight_decay=config.weight_decay)
    total = phases.updates_per_epoch("clar")
    loss = phases.clar_epoch(predictor, optimizer, {"t": 0}, 1, total, "test")
    return trainer, predictor, loss


def test_closed_loop_trains_the_predictor_alone(pipe, recording, tmp_path):
    """Loss "final" back-propagates through the text encoders' embeddings too: every module of the pipeline is frozen
    during the epoch (no parameter of any component ends it holding a gradient) and its flags restored after."""
    before = component_flags(pipe)
    assert any(any(flags) for flags in before.values())  # trainable as loaded: freezing them is the epoch's doing
    trainer, predictor, _ = one_epoch(pipe, recording, tmp_path / "p")
    start = trainer.phases().new_predictor(0)
    assert any(not torch.equal(a, b) for a, b in zip(predictor.parameters(), start.parameters(), strict=True))
    held = [name for name, module in pipe.components.items() if isinstance(module, torch.nn.Module)]
    held = [name for name in held if any(p.grad is not None for p in pipe.components[name].parameters())]
    assert held == []
    assert component_flags(pipe) == before


def rollout(
    pipe, trainer: Trainer, predictor, checkpoint_trunk: bool, checkpoint_calls: bool = False
) -> tuple[list[torch.Tensor], dict, dict]:
    """The gradient of `final_loss` on two training trajectories over every predictor weight, the live tensor bytes
    after the forward and at the peak of forward + backward, and the runtime's counts."""
    phases = trainer.phases()
    batch = trainer.train_idx[:2]
    data = [trainer.data.load(i) for i in batch]
    config = lesa.LESAConfig(
        predictor=predictor,
        differentiable=True,
        history_grad=True,
        checkpoint_trunk=checkpoint_trunk,
        checkpoint_calls=checkpoint_calls,
        count_flops=False,
    )
    lesa.enable(pipe, config)
    try:
        with frozen_pipeline(pipe), LiveTensorBytes() as memory:
            loss = phases.final_loss(batch, data)
            forward = memory.now
            grads = torch.autograd.grad(loss, list(predictor.parameters()))
        counts = get_runtime(pipe.transformer).summary()
    finally:
        lesa.disable(pipe)
    return list(grads), {"forward": forward, "peak": memory.peak}, counts


def test_checkpointing_the_trunk_keeps_the_gradient_and_bounds_the_memory(pipe, recording, tmp_path):
    """Gradient checkpointing of the trunk blocks (the default) changes no gradient, bit for bit on the CPU, and
    keeps far less for backward: each block's inputs instead of its activations. The bookkeeping (block calls, the
    policy's history) runs once per call: recomputation re-runs the block forwards alone."""
    trainer = Trainer(recording, pipe, tmp_path / "p", TrainConfig(**CALIBRATED), **QUIET)
    predictor = trainer.phases().new_predictor(0)
    plain, plain_memory, plain_counts = rollout(pipe, trainer, predictor, checkpoint_trunk=False)
    checked, checked_memory, checked_counts = rollout(pipe, trainer, predictor, checkpoint_trunk=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, checked, strict=True))
    assert any(g.abs().sum() > 0 for g in plain)
    assert checked_counts == plain_counts
    print(f"live tensor bytes without / with checkpointing: {plain_memory} / {checked_memory}")
    assert checked_memory["forward"] < 0.3 * plain_memory["forward"]
    assert checked_memory["peak"] < 0.6 * plain_memory["peak"]
    # the whole call checkpointed instead: the same gradient (recomputed with the same ops), the books kept once
    calls, calls_memory, calls_counts = rollout(pipe, trainer, predictor, checkpoint_trunk=True, checkpoint_calls=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, calls, strict=True))
    assert calls_counts == plain_counts
    print(f"with the calls checkpointed: {calls_memory}")
    assert calls_memory["forward"] < checked_memory["forward"]


def test_micro_batches_accumulate_the_whole_batch_update(pipe, recording, tmp_path):
    """--micro-batch 1: the minibatch's trajectories rolled out one at a time, their gradients accumulated into the
    one update per minibatch: the same update up to float summation order (~1e-6 relative in the gradient). Plain SGD
    shows it in the weights: Adam's first step moves a weight by about lr whatever the size of its gradient, so a
    weight whose gradient is at rounding level (here the stage mixers' biases, ~1e-7 of the others) would move by
    +-lr on the sign of rounding noise. A memory setting: not part of a checkpoint's fingerprint (a run resumes with
    another), and refused where the loss updates inside the rollout."""
    sgd = torch.optim.SGD
    trainer, whole, whole_loss = one_epoch(pipe, recording, tmp_path / "whole", optimizer=sgd)
    _, micro, micro_loss = one_epoch(pipe, recording, tmp_path / "micro", optimizer=sgd, micro_batch=1)

    def max_abs_diff(a: torch.nn.Module, b: torch.nn.Module) -> float:
        return max(float((x - y).detach().abs().max()) for x, y in zip(a.parameters(), b.parameters(), strict=True))

    diff, moved = max_abs_diff(whole, micro), max_abs_diff(whole, trainer.phases().new_predictor(0))
    print(f"micro-batch 1 vs whole batch: loss {micro_loss} / {whole_loss}, max abs weight difference {diff:.2e}")
    print(f"(the epoch moved the weights by up to {moved:.2e})")
    assert micro_loss == pytest.approx(whole_loss, rel=1e-6)
    assert diff < 1e-7 and moved > 1e-4

    assert TrainConfig(micro_batch=2, loss="final").fingerprint() == TrainConfig(loss="final").fingerprint()
    assert TrainConfig(checkpoint_trunk=False).fingerprint() == TrainConfig().fingerprint()
    with pytest.raises(ValueError, match="micro_batch must be >= 1"):
        TrainConfig(micro_batch=0, loss="final")
    with pytest.raises(ValueError, match="micro_batch splits the rollouts of loss 'final'"):
        TrainConfig(micro_batch=2)


def test_train_cli_sets_the_memory_options():
    def config(*flags):
        return _train_config(_parser().parse_args(["train", "--data", "d", "--out", "o", *flags]))

    default = config()
    assert (default.micro_batch, default.checkpoint_trunk) == (None, True)
    assert config("--micro-batch", "2").micro_batch == 2
    assert _parser().parse_args(["train", "--data", "d", "--out", "o", "--cpu-offload"]).cpu_offload
    assert config("--set", "checkpoint_trunk=false").checkpoint_trunk is False
    with pytest.raises(ValueError, match="micro_batch splits"):
        config("--recipe", "paper", "--micro-batch", "2")


def test_offloaded_encoders_visit_the_device_for_their_own_calls_only(pipe, recording, tmp_path):
    """lesa train --cpu-offload: every model but the transformer stays on the CPU, moved to the device for each of
    its forward calls and back after it; the pipeline computes on the hooks' device; a closed-loop epoch trains the
    same predictor as with everything on the device. (On the CPU a move is a no-op, so the moves are counted.)"""
    from lesa.pipelines import offload_encoders_to_cpu
    from lesa.testing import tiny_flux_pipeline

    offloaded = tiny_flux_pipeline()
    offloaded.set_progress_bar_config(disable=True)
    offload_encoders_to_cpu(offloaded, "cpu")
    assert offloaded._execution_device == torch.device("cpu")
    moves: dict[str, list[str]] = {}
    for name in ("text_encoder", "text_encoder_2", "vae", "transformer"):
        module = getattr(offloaded, name)
        move = module.to

        def spy(*args, _name=name, _move=move, **kwargs):
            moves.setdefault(_name, []).append(str(args[0]))
            return _move(*args, **kwargs)

        module.to = spy
    _, predictor, loss = one_epoch(offloaded, recording, tmp_path / "offloaded")
    _, reference, reference_loss = one_epoch(pipe, recording, tmp_path / "resident")
    assert loss == reference_loss
    assert all(torch.equal(a, b) for a, b in zip(predictor.parameters(), reference.parameters(), strict=True))
    for name in ("text_encoder", "text_encoder_2"):  # one visit per forward call: to the device, then back
        assert len(moves[name]) >= 2 and moves[name] == ["cpu", "cpu"] * (len(moves[name]) // 2)
    assert "transformer" not in moves and "vae" not in moves  # the rollout decodes nothing


def test_truncation_step():
    full = [0, 1, 2, 3, 10, 17, 24, 31, 38, 45]  # 50 steps, interval 7, warm-up 3: cycles open at 3, 10, ..., 45
    assert truncation_step(full, 50, None) == 0
    assert truncation_step(full, 50, 1) == 45
    assert truncation_step(full, 50, 2) == 38
    assert truncation_step(full, 50, 6) == 10
    assert truncation_step(full, 50, 7) == 0  # as many cycles as the schedule has: the whole sampler
    assert truncation_step([0, 1, 2, 5, 8, 9], 10, 1) == 5  # 8 opens no cycle (9 is full), nor does 9 (the last step)
    with pytest.raises(ValueError, match="truncate_cycles must be >= 1"):
        TrainConfig(truncate_cycles=0, loss="final")
    with pytest.raises(ValueError, match="needs loss 'final'"):
        TrainConfig(truncate_cycles=1)


def test_truncated_back_propagation_keeps_only_the_last_cycles(pipe, recording, tmp_path):
    """--set truncate_cycles=1: the rollout runs without autograd until the last cache cycle opens, so no forecast,
    correction or latent before it carries a graph (nor is memory kept for them), while the gradient still reaches
    the predictor through the last cycle; truncating to as many cycles as the schedule has is no truncation."""
    trainer = Trainer(recording, pipe, tmp_path / "p", TrainConfig(**CALIBRATED), **QUIET)
    phases = trainer.phases()
    predictor = phases.new_predictor(0)
    full = phases.schedule.full_steps(phases.num_steps)
    start = truncation_step(full, phases.num_steps, 1)
    assert start > 0

    def run(grad_from_step: int):
        batch = trainer.train_idx[:2]
        data = [trainer.data.load(i) for i in batch]
        config = lesa.LESAConfig(
            predictor=predictor,
            differentiable=True,
            history_grad=True,
            grad_from_step=grad_from_step,
            count_flops=False,
        )
        tracked: dict[int, bool] = {}
        lesa.enable(pipe, config)
        get_runtime(pipe.transformer).observers.append(lambda e: tracked.setdefault(e.step, e.output.requires_grad))
        try:
            with frozen_pipeline(pipe), LiveTensorBytes() as memory:
                loss = phases.final_loss(batch, data)
                forward = memory.now
                grads = torch.autograd.grad(loss, list(predictor.parameters()), allow_unused=True)
        finally:
            lesa.disable(pipe)
        grads = [torch.zeros_like(p) if g is None else g for g, p in zip(grads, predictor.parameters(), strict=True)]
        return grads, forward, tracked

    whole, whole_forward, whole_tracked = run(0)
    cut, cut_forward, cut_tracked = run(start)
    # from `start` on: every forecast, and the full step opening the cycle (its learned correction)
    assert [s for s, g in cut_tracked.items() if g] == [s for s in cut_tracked if s >= start]
    assert any(whole_tracked[s] for s in whole_tracked if s < start)
    assert any(g.abs().sum() > 0 for g in cut) and all(torch.isfinite(g).all() for g in cut)
    assert any(not torch.allclose(a, b) for a, b in zip(whole, cut, strict=True))
    print(f"live tensor bytes after the forward, whole / truncated to 1 cycle: {whole_forward} / {cut_forward}")
    assert cut_forward < 0.6 * whole_forward
    again, _, _ = run(truncation_step(full, phases.num_steps, len(full)))
    assert all(torch.equal(a, b) for a, b in zip(whole, again, strict=True))


# FLUX.1-dev's transformer widths (24 heads of 128, mlp ratio 4, its rope axes), 1 double + 1 single block, in the
# tiny FLUX pipeline (whose 16x16 images are 64 latent tokens, here with 8 text tokens)
REAL_WIDTH = dict(
    patch_size=1,
    in_channels=4,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=32,
    pooled_projection_dim=32,
    axes_dims_rope=(16, 56, 56),
)


@pytest.fixture(scope="module")
def real_width_pipe():
    from diffusers import FluxTransformer2DModel

    from lesa.testing import tiny_flux_pipeline

    pipe = tiny_flux_pipeline()
    with torch.device("meta"):  # 520 M parameters: scaled normal weights, without the slow default init
        transformer = FluxTransformer2DModel(**REAL_WIDTH)
    transformer = transformer.to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in transformer.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.01))
    pipe.transformer = transformer
    pipe.set_progress_bar_config(disable=True)
    return pipe


def real_width_rollout(pipe, steps: int, full_steps: int, checkpoint_calls: bool) -> tuple[int, int]:
    """Live tensor bytes at the peak of a closed-loop rollout + backward (the calibrated gradient: history_grad, a
    learned correction), and how many of its full steps run under autograd (those after the first cached step)."""
    from lesa.predictor import ScheduleFreeConfig, ScheduleFreePredictor

    torch.manual_seed(0)
    predictor = ScheduleFreePredictor(
        ScheduleFreeConfig(model_class="FluxTransformer2DModel", tap="trunk", feature_dim=3072, warmup=3)
    )
    config = lesa.LESAConfig(
        predictor=predictor,
        full_steps=full_steps,
        differentiable=True,
        history_grad=True,
        checkpoint_calls=checkpoint_calls,
        count_flops=False,
    )
    call = inspect.unwrap(type(pipe).__call__)
    lesa.enable(pipe, config)
    try:
        with frozen_pipeline(pipe), torch.enable_grad(), LiveTensorBytes() as memory:
            out = call(
                pipe,
                "a red circle",
                num_inference_steps=steps,
                height=16,
                width=16,
                output_type="latent",
                max_sequence_length=8,
                generator=torch.Generator().manual_seed(0),
            ).images
            torch.autograd.grad(out.square().mean(), list(predictor.parameters()), allow_unused=True)
        full = lesa.summary(pipe)["full_step_indices"]
    finally:
        lesa.disable(pipe)
    first_cached = next(s for s in range(steps) if s not in full)
    return memory.peak, sum(s > first_cached for s in full)


def test_checkpointed_rollout_memory_at_real_width_stops_growing_with_full_steps(real_width_pipe):
    """At FLUX.1-dev's widths, with the same 6 cached steps and 3 or 9 full steps: with the calls checkpointed
    (checkpoint_calls) the peak grows per full step under autograd by less than two of the trunk's hidden states
    (the feature the later forecasts read and its gradient), where checkpointed blocks keep every block's inputs
    per full step too. Bounded per step by the feature, not by a trunk call: one call's activations are the
    constant part."""
    hidden = (64 + 8) * 3072 * 4  # the tapped feature is a view of the joint (text + image) hidden state
    growth = {}
    for calls in (True, False):
        small, small_graph = real_width_rollout(real_width_pipe, 9, 3, calls)
        large, large_graph = real_width_rollout(real_width_pipe, 15, 9, calls)
        assert large_graph - small_graph >= 4
        growth[calls] = (large - small) / (large_graph - small_graph)
    print(
        f"peak growth per full step under autograd: calls {growth[True] / 1e6:.2f} MB, blocks "
        f"{growth[False] / 1e6:.2f} MB; the hidden state {hidden / 1e6:.2f} MB"
    )
    assert growth[True] < 2 * hidden
    assert growth[False] > 1.5 * growth[True]


def test_a_cycle_end_no_forecast_reached_is_left_out_of_the_loss(pipe, recording, tmp_path):
    """One trajectory rolled out alone reproduces its recording exactly until the first forecast: the log error of
    a latent entering a step before it would be -inf, and the non-finite loss would skip the whole update (as every
    --micro-batch 1 update of a schedule with a full step right after the warm-up did). Such a latent is a constant
    and is left out."""
    trainer = Trainer(recording, pipe, tmp_path / "p", TrainConfig(**CALIBRATED), **QUIET)
    phases = trainer.phases()
    predictor = phases.new_predictor(0)
    batch = trainer.train_idx[:1]
    data = [trainer.data.load(i) for i in batch]
    config = lesa.LESAConfig(predictor=predictor, differentiable=True, history_grad=True, count_flops=False)
    lesa.enable(pipe, config)
    try:
        with frozen_pipeline(pipe):
            alone = closed_loop_loss(trainer.scorer, batch, data, [])
            early = closed_loop_loss(trainer.scorer, batch, data, [1])  # entering step 1: warm-up only
    finally:
        lesa.disable(pipe)
    assert torch.isfinite(early) and early.item() == alone.item()
