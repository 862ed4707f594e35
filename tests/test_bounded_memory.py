"""The closed loop's memory (issue 33): a frozen pipeline, gradient checkpointing of the trunk, micro-batches."""

from __future__ import annotations

import weakref

import pytest
import torch
from test_record_train import QUICK_CALIBRATED, QUIET
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import lesa
from lesa.cli import _parser, _train_config
from lesa.runtime import get_runtime
from lesa.training import TrainConfig, Trainer
from lesa.training.phases import frozen_pipeline

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


def rollout(pipe, trainer: Trainer, predictor, checkpoint_trunk: bool) -> tuple[list[torch.Tensor], dict, dict]:
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
    assert config("--set", "checkpoint_trunk=false").checkpoint_trunk is False
    with pytest.raises(ValueError, match="micro_batch splits"):
        config("--recipe", "paper", "--micro-batch", "2")
