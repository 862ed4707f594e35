"""lesa and diffusers' own cache API on one transformer: one cache at a time, refused in either order with both names;
lesa is the transformer's cache while on (`is_cache_enabled`, `disable_cache()`); a LESA predictor serving a cache
context it was not trained on warns once."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import generate, tiny_predictor
from diffusers.hooks import (
    FirstBlockCacheConfig,
    HookRegistry,
    MagCacheConfig,
    PyramidAttentionBroadcastConfig,
    TaylorSeerCacheConfig,
    apply_first_block_cache,
)

import lesa
from lesa.runtime import _DIFFUSERS_CACHE_HOOKS

STEPS = 10  # enough for cached steps (full 0-3, 6, 9 at interval 3), few enough for the CPU


def first_block_cache() -> FirstBlockCacheConfig:
    return FirstBlockCacheConfig(threshold=0.5)


def run(pipe, **kwargs) -> torch.Tensor:
    return generate(pipe, steps=STEPS, **kwargs)


@pytest.fixture
def clean(pipe):
    """The shared pipeline, left without any cache whatever a test did."""
    yield pipe
    transformer = pipe.transformer
    # last registered, first removed: diffusers' `remove_hook` of a hook with a `new_forward` hook above it leaves
    # the one above calling the removed one. The functional API's hooks (unknown to `disable_cache`) come last here.
    registry = HookRegistry.check_if_exists_or_initialize(transformer)
    for name in _DIFFUSERS_CACHE_HOOKS:
        registry.remove_hook(name, recurse=True)
    registry.invalidate_child_registries_cache()
    lesa.disable(pipe)
    if transformer.is_cache_enabled:
        transformer.disable_cache()


@pytest.fixture(scope="module")
def reference(pipe) -> torch.Tensor:
    return run(pipe)


@pytest.mark.parametrize(
    "make",
    [
        first_block_cache,
        lambda: TaylorSeerCacheConfig(cache_interval=3),
        lambda: MagCacheConfig(calibrate=True, num_inference_steps=STEPS),
        lambda: PyramidAttentionBroadcastConfig(current_timestep_callback=lambda: 500),
    ],
    ids=["FirstBlockCache", "TaylorSeerCache", "MagCache", "PyramidAttentionBroadcast"],
)
def test_lesa_is_refused_on_a_transformer_running_a_diffusers_cache(clean, make):
    pipe = clean
    config = make()
    pipe.transformer.enable_cache(config)
    name = type(config).__name__
    with pytest.raises(ValueError, match=rf"already has diffusers' {name} enabled; disable it .*lesa's FORAConfig"):
        lesa.enable(pipe, lesa.FORAConfig(interval=3))
    assert not hasattr(pipe.transformer, "_lesa_runtime")
    assert pipe.transformer._cache_config is config


def test_a_refused_lesa_changes_nothing(clean, reference):
    pipe = clean
    pipe.transformer.enable_cache(first_block_cache())
    cached = run(pipe)
    assert not torch.equal(cached, reference)  # the diffusers cache does skip work here
    with pytest.raises(ValueError, match="FirstBlockCacheConfig.*LESAConfig"):
        lesa.enable(pipe, lesa.LESAConfig(predictor=_predictor(pipe)))
    assert torch.equal(run(pipe), cached)
    with pytest.raises(RuntimeError, match="lesa is not enabled"):
        lesa.summary(pipe)
    pipe.transformer.disable_cache()
    assert torch.equal(run(pipe), reference)


def test_diffusers_cache_is_refused_while_lesa_is_on(clean, reference):
    pipe = clean
    config = lesa.FORAConfig(interval=3)
    lesa.enable(pipe, config)
    cached = run(pipe)
    assert not torch.equal(cached, reference)
    refused = "cannot enable diffusers' FirstBlockCacheConfig: lesa's FORAConfig is enabled"
    with pytest.raises(ValueError, match=refused):
        pipe.transformer.enable_cache(first_block_cache())
    assert pipe.transformer._cache_config is config
    assert torch.equal(run(pipe), cached)
    assert lesa.summary(pipe)["full_steps"] == 6  # 0-3, 6, 9: lesa alone
    lesa.disable(pipe)
    assert torch.equal(run(pipe), reference)


def test_functional_diffusers_cache_hooks_are_refused(clean):
    """Hooks registered without `enable_cache` leave `_cache_config` unset: lesa finds them in the hook registries."""
    pipe = clean
    apply_first_block_cache(pipe.transformer, first_block_cache())
    assert not pipe.transformer.is_cache_enabled
    with pytest.raises(ValueError, match=r"diffusers' FirstBlockCache hooks \(fbc_block_hook, fbc_leader_block_hook"):
        lesa.enable(pipe, lesa.FORAConfig())


def test_a_refused_replacement_keeps_lesa_on(clean):
    """`lesa.enable` over lesa replaces it, but checks for a diffusers cache first: a refusal leaves the old lesa on."""
    pipe = clean
    config = lesa.FORAConfig(interval=3)
    runtime = lesa.enable(pipe, config)
    apply_first_block_cache(pipe.transformer, first_block_cache())
    with pytest.raises(ValueError, match="FirstBlockCache hooks"):
        lesa.enable(pipe, lesa.TaylorSeerConfig())
    assert lesa.get_runtime(pipe.transformer) is runtime
    assert pipe.transformer._cache_config is config


def test_disable_cache_removes_lesa_and_is_cache_enabled_follows_it(clean, reference):
    pipe = clean
    transformer = pipe.transformer
    assert not transformer.is_cache_enabled
    for config in (lesa.FORAConfig(interval=3), lesa.TaylorSeerConfig(interval=3), lesa.FORAConfig(interval=3)):
        lesa.enable(pipe, config)
        assert transformer.is_cache_enabled and transformer._cache_config is config
        cached = run(pipe)
        assert not torch.equal(cached, reference)
        transformer.disable_cache()
        assert not transformer.is_cache_enabled
        assert not hasattr(transformer, "_lesa_runtime")
        assert torch.equal(run(pipe), reference)
        lesa.disable(pipe)  # after disable_cache: nothing left to remove
        lesa.enable(pipe, config)
        assert transformer.is_cache_enabled
        assert torch.equal(run(pipe), cached)
        lesa.disable(pipe)
        assert not transformer.is_cache_enabled
        assert {"enable_cache", "disable_cache", "_cache_config"}.isdisjoint(vars(transformer))
        assert torch.equal(run(pipe), reference)
    # after lesa, diffusers' cache works as on a transformer that never had lesa
    transformer.enable_cache(first_block_cache())
    assert transformer.is_cache_enabled
    fbc = run(pipe)
    transformer.disable_cache()
    assert torch.equal(run(pipe), reference)
    transformer.enable_cache(first_block_cache())
    assert torch.equal(run(pipe), fbc)


def test_models_without_cache_mixin_keep_working():
    from lesa.testing import tiny_sd3_pipeline

    transformer = tiny_sd3_pipeline().transformer
    assert not hasattr(transformer, "enable_cache")
    lesa.apply_lesa_cache(transformer, lesa.FORAConfig())
    assert {"enable_cache", "disable_cache", "_cache_config"}.isdisjoint(vars(transformer))
    lesa.remove_lesa_cache(transformer)
    assert not hasattr(transformer, "_lesa_runtime")


# ---------------------------------------------------------------------------------------- untrained cache contexts


def _predictor(pipe, contexts=("cond",)):
    pipe.scheduler.set_timesteps(STEPS)
    return tiny_predictor(
        num_steps=STEPS,
        sigmas=pipe.scheduler.sigmas.tolist(),
        feature_dim=pipe.transformer.inner_dim,
        contexts=list(contexts),
        dtype="float32",
        interval=3,
        warmup=3,
    )


def test_a_predictor_serving_an_untrained_context_warns_once(clean):
    pipe = clean
    lesa.enable(pipe, lesa.LESAConfig(predictor=_predictor(pipe)))
    true_cfg = dict(negative_prompt="blurry", true_cfg_scale=4.0)
    with pytest.warns(UserWarning, match="trained on cache context\\(s\\) \\['cond'\\], not 'uncond'") as caught:
        run(pipe, **true_cfg)
        run(pipe, **true_cfg)
    assert len([w for w in caught if "not 'uncond'" in str(w.message)]) == 1
    assert set(lesa.summary(pipe)["contexts"]) == {"cond", "uncond"}


def test_a_predictor_trained_on_every_context_does_not_warn(clean):
    pipe = clean
    lesa.enable(pipe, lesa.LESAConfig(predictor=_predictor(pipe, contexts=("cond", "uncond"))))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(pipe, negative_prompt="blurry", true_cfg_scale=4.0)
    assert not [w for w in caught if "cache context" in str(w.message)]
