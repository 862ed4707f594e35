import pytest
import torch
from conftest import STEPS, generate

import lesa
from lesa.predictor import LESAPredictor, PredictorConfig


def predictor_for(pipe, num_steps=STEPS, width=None, model_class=None, **kw) -> LESAPredictor:
    pipe.scheduler.set_timesteps(num_steps)
    torch.manual_seed(0)
    config = PredictorConfig(
        model_class=model_class or type(pipe.transformer).__name__,
        tap="t",
        num_steps=num_steps,
        sigmas=pipe.scheduler.sigmas.tolist(),
        feature_dim=width or pipe.transformer.inner_dim,
        kan_hidden=[8, 8],
        dtype="float32",
        **kw,
    )
    return LESAPredictor(config)


@pytest.fixture
def clean(pipe):
    yield pipe
    lesa.disable(pipe)


def all_configs(pipe, interval):
    return [
        lesa.NoCacheConfig(),
        lesa.FORAConfig(interval=interval),
        lesa.TaylorSeerConfig(interval=interval, order=2),
        lesa.LESAConfig(predictor=predictor_for(pipe, interval=interval)),
    ]


def test_every_policy_with_n1_equals_the_plain_pipeline(clean):
    pipe = clean
    reference = generate(pipe)
    for config in all_configs(pipe, interval=1):
        lesa.enable(pipe, config)
        out = generate(pipe)
        assert torch.allclose(out, reference, atol=1e-6, rtol=0), config.name
        assert lesa.summary(pipe)["full_steps"] == STEPS


def test_enable_disable_reenable_leaves_the_pipeline_as_it_was(clean):
    pipe = clean
    reference = generate(pipe)
    config = lesa.TaylorSeerConfig(interval=7)
    lesa.enable(pipe, config)
    cached = generate(pipe)
    assert not torch.allclose(cached, reference)  # caching does change the result
    lesa.disable(pipe)
    assert torch.equal(generate(pipe), reference)
    lesa.enable(pipe, config)
    assert torch.equal(generate(pipe), cached)
    lesa.enable(pipe, config)  # enabling again replaces, never stacks
    assert torch.equal(generate(pipe), cached)
    lesa.disable(pipe)
    assert torch.equal(generate(pipe), reference)
    assert not hasattr(pipe.transformer, "_lesa_runtime")


def test_counts_and_flops_at_n7_e3(clean):
    pipe = clean
    for config in all_configs(pipe, interval=7)[1:]:
        lesa.enable(pipe, config)
        generate(pipe)
        info = lesa.summary(pipe)
        assert info["steps"] == 50
        assert info["full_steps"] == 10
        assert info["trunk_executions"] == 10  # counted from the trunk blocks that actually ran
        assert info["trunk_speedup"] == 5.0
        full, cached = info["flops_full_call"], info["flops_cached_call"]
        assert full > 0 and 0 < cached < full
        assert info["head_share"] == pytest.approx(cached / full)
        assert info["flops_speedup"] == pytest.approx(50 * full / (10 * full + 40 * cached))
        # the speed-up falls short of 5.0 by exactly the head's counted share
        assert 5.0 / (1 + 4 * info["head_share"]) == pytest.approx(info["flops_speedup"])


def test_state_resets_between_generations(clean):
    pipe = clean
    lesa.enable(pipe, lesa.TaylorSeerConfig(interval=7))
    first = generate(pipe)
    second = generate(pipe)
    assert torch.equal(first, second)
    assert lesa.summary(pipe)["steps"] == 50
    # also without the pipeline's end-of-call reset: a new generation is detected from sigma rising again
    lesa.enable(pipe, lesa.TaylorSeerConfig(interval=7))
    transformer = pipe.transformer
    kwargs = dict(
        hidden_states=torch.randn(1, 16, 4),
        encoder_hidden_states=torch.randn(1, 7, 32),
        pooled_projections=torch.randn(1, 32),
        txt_ids=torch.zeros(7, 3),
        img_ids=torch.zeros(16, 3),
    )
    pipe.scheduler.set_timesteps(10)
    outs = []
    for _ in range(2):
        for sigma in pipe.scheduler.sigmas[:-1]:
            outs.append(transformer(timestep=sigma.reshape(1), **kwargs).sample)
    assert all(torch.equal(a, b) for a, b in zip(outs[:10], outs[10:], strict=True))
    assert lesa.summary(pipe)["contexts"]["default"]["steps"] == 10


def test_cond_and_uncond_keep_separate_state(clean):
    pipe = clean
    seen = {}
    config = lesa.LESAConfig(predictor=predictor_for(pipe, interval=7, contexts=["cond", "uncond"]))
    runtime = lesa.enable(pipe, config)
    runtime.observers.append(lambda e: seen.setdefault(e.context, []).append(e.tap.clone()))
    generate(pipe, negative_prompt="blurry", true_cfg_scale=4.0, prompt="a cat")
    info = lesa.summary(pipe)
    assert set(info["contexts"]) == {"cond", "uncond"}
    for ctx in ("cond", "uncond"):
        assert info["contexts"][ctx]["steps"] == 50 and info["contexts"][ctx]["full_steps"] == 10
    assert len(seen["cond"]) == len(seen["uncond"]) == 50
    assert not torch.equal(torch.stack(seen["cond"]), torch.stack(seen["uncond"]))


def test_mismatched_predictors_are_refused(clean):
    pipe = clean
    with pytest.raises(
        ValueError, match="trained for QwenImageTransformer2DModel, but the transformer is a FluxTransformer2DModel"
    ):
        lesa.enable(pipe, lesa.LESAConfig(predictor=predictor_for(pipe, model_class="QwenImageTransformer2DModel")))
    lesa.enable(pipe, lesa.LESAConfig(predictor=predictor_for(pipe, width=64)))
    with pytest.raises(ValueError, match=r"features of width 64, but this model's tapped feature has width 32"):
        generate(pipe)
    lesa.enable(pipe, lesa.LESAConfig(predictor=predictor_for(pipe, num_steps=30)))
    with pytest.raises(ValueError, match=r"31 values \(30 steps\); the pipeline's schedule has 51 values"):
        generate(pipe)


def test_unknown_model_class_lists_the_supported_ones():
    with pytest.raises(ValueError, match="'Linear' is not supported by lesa; supported: FluxTransformer2DModel"):
        lesa.apply_lesa_cache(torch.nn.Linear(2, 2), lesa.FORAConfig())


def test_no_trunk_block_runs_on_a_cached_step(clean):
    pipe = clean
    calls = []
    blocks = list(pipe.transformer.transformer_blocks) + list(pipe.transformer.single_transformer_blocks)
    # a block's attention runs only when the block itself really executes
    handles = [b.attn.register_forward_hook(lambda *a: calls.append(1)) for b in blocks]
    try:
        lesa.enable(pipe, lesa.FORAConfig(interval=7))
        generate(pipe)
    finally:
        for h in handles:
            h.remove()
    assert len(calls) == 10 * len(blocks)
    assert lesa.summary(pipe)["trunk_executions"] == 10


def test_residual_mode_forecasts_what_the_trunk_adds(clean):
    """residual=True: a cached step's tap is its own trunk input plus the forecast of (tap - trunk input)."""
    pipe = clean
    inputs, taps = {}, {}
    first = pipe.transformer.transformer_blocks[0]
    handle = first.register_forward_pre_hook(
        lambda m, a, kw: inputs.__setitem__(len(inputs), kw["hidden_states"].clone()), with_kwargs=True
    )
    try:
        runtime = lesa.enable(pipe, lesa.FORAConfig(interval=7, residual=True))
        runtime.observers.append(lambda e: taps.__setitem__(e.step, (e.full, e.tap.clone())))
        cached = generate(pipe)
    finally:
        handle.remove()
    full = [s for s, (is_full, _) in taps.items() if is_full]
    assert lesa.summary(pipe)["full_steps"] == len(full) == 10
    for step, (is_full, tap) in taps.items():
        if not is_full:
            last = max(f for f in full if f < step)
            expected = inputs[step] + (taps[last][1] - inputs[last])
            torch.testing.assert_close(tap, expected)
    # it differs from reusing the whole feature, and every step full stays exact
    lesa.enable(pipe, lesa.FORAConfig(interval=7))
    assert not torch.allclose(generate(pipe), cached)
    lesa.disable(pipe)
    reference = generate(pipe)
    lesa.enable(pipe, lesa.TaylorSeerConfig(interval=1, residual=True))
    torch.testing.assert_close(generate(pipe), reference, atol=1e-6, rtol=0)


def test_residual_mode_is_refused_where_it_has_no_meaning(clean):
    from lesa.adapters import QWEN_IMAGE

    assert not QWEN_IMAGE.residual_stream
    with pytest.raises(ValueError, match="residual=True needs a tap on the trunk's residual stream"):
        lesa.apply_lesa_cache(_FakeQwen(), lesa.FORAConfig(residual=True))
    with pytest.raises(ValueError, match="what it was trained on, the tapped feature"):
        lesa.LESAConfig(predictor=predictor_for(clean), residual=True)


class _FakeQwen(torch.nn.Module):
    """Only its class name matters: the adapter check comes before any hook."""


_FakeQwen.__name__ = "QwenImageTransformer2DModel"
