"""Qwen-Image (true CFG), HunyuanVideo, Wan and SD3 through the same engine, on tiny pipelines of the real classes."""

import pytest
import torch

import lesa
from lesa.predictor import LESAPredictor, PredictorConfig
from lesa.testing import (
    tiny_flux_pipeline,
    tiny_hunyuanvideo_pipeline,
    tiny_qwenimage_pipeline,
    tiny_sd3_pipeline,
    tiny_wan_pipeline,
)

STEPS = 10
# Qwen-Image: 32x32 pixels -> 16 tokens; video: 16x16 pixels, 5 frames -> 2x2x2 latents
CASES = {
    "qwenimage": (tiny_qwenimage_pipeline, dict(height=32, width=32, negative_prompt="blurry", true_cfg_scale=4.0)),
    "hunyuanvideo": (tiny_hunyuanvideo_pipeline, dict(height=16, width=16, num_frames=5)),
    "wan": (tiny_wan_pipeline, dict(height=16, width=16, num_frames=5, guidance_scale=5.0, max_sequence_length=16)),
    "sd3": (tiny_sd3_pipeline, dict(height=16, width=16, guidance_scale=5.0, max_sequence_length=16)),
}


@pytest.fixture(scope="module")
def pipes():
    built = {}
    for name, (build, _) in CASES.items():
        pipe = build()
        pipe.set_progress_bar_config(disable=True)
        built[name] = pipe
    return built


def run(pipe, name, seed=0, steps=STEPS, **kw):
    kwargs = dict(CASES[name][1], num_inference_steps=steps, output_type="latent", prompt="a red cat")
    kwargs.update(kw)
    result = pipe(generator=torch.Generator().manual_seed(seed), **kwargs)
    return result.images if hasattr(result, "images") else result.frames


def predictor(pipe, steps=STEPS, contexts=("cond", "uncond"), **kw) -> LESAPredictor:
    pipe.scheduler.set_timesteps(steps)
    adapter = lesa.get_adapter(pipe.transformer)
    tap = pipe.transformer.get_submodule(adapter.tap_module)
    if adapter.tap_point == "output":
        width = tap.out_features
    else:
        width = tap.in_features if hasattr(tap, "in_features") else tap.normalized_shape[0]
    torch.manual_seed(0)
    config = PredictorConfig(
        model_class=adapter.model_class,
        tap=adapter.tap,
        num_steps=steps,
        sigmas=pipe.scheduler.sigmas.tolist(),
        feature_dim=width,
        kan_hidden=[4],
        dtype="float32",
        contexts=list(contexts),
        **kw,
    )
    return LESAPredictor(config)


@pytest.mark.parametrize("name", list(CASES))
def test_n1_is_identical_and_counts_follow_the_schedule(pipes, name):
    pipe = pipes[name]
    reference = run(pipe, name)
    try:
        for config in (lesa.NoCacheConfig(), lesa.FORAConfig(interval=1), lesa.TaylorSeerConfig(interval=1, order=2)):
            lesa.enable(pipe, config)
            assert torch.equal(run(pipe, name), reference), (name, config.name)
            assert lesa.summary(pipe)["full_steps"] == STEPS
        two = {"cond", "uncond"}
        contexts = {"qwenimage": two, "wan": two, "hunyuanvideo": {"cond"}, "sd3": {"default"}}[name]
        schedule = lesa.StepSchedule(interval=3, warmup=1)
        full = schedule.full_steps(STEPS)  # [0, 1, 4, 7]
        for config in (lesa.FORAConfig(interval=3, warmup=1), lesa.TaylorSeerConfig(interval=3, warmup=1)):
            lesa.enable(pipe, config)
            cached = run(pipe, name)
            assert not torch.equal(cached, reference)
            info = lesa.summary(pipe)
            assert set(info["contexts"]) == contexts
            for ctx in contexts:
                c = info["contexts"][ctx]
                assert (c["steps"], c["full_steps"], c["trunk_executions"]) == (STEPS, len(full), len(full))
            assert 1 < info["flops_speedup"] < STEPS / len(full)
    finally:
        lesa.disable(pipe)
    assert torch.equal(run(pipe, name), reference)


def test_qwen_uncond_has_its_own_history_and_uses_the_negative_prompt(pipes):
    pipe = pipes["qwenimage"]
    taps: dict[str, dict[str, list[torch.Tensor]]] = {}
    config = lesa.LESAConfig(predictor=predictor(pipe, interval=3, warmup=1))
    runtime = lesa.enable(pipe, config)
    policies = {}
    try:
        outs = {}
        for negative in ("blurry", "a photo of a dog"):
            seen = taps.setdefault(negative, {})
            runtime.observers.append(lambda e, seen=seen: seen.setdefault(e.context, []).append(e.tap.clone()))
            runtime.observers.append(lambda e: policies.setdefault(e.context, runtime.state_manager.get_state().policy))
            outs[negative] = run(pipe, "qwenimage", negative_prompt=negative)
            runtime.observers.clear()
            assert len(seen["cond"]) == len(seen["uncond"]) == STEPS
        # separate policies: the two contexts' histories differ, and the uncond one follows the negative prompt
        blurry, dog = taps["blurry"], taps["a photo of a dog"]
        assert not torch.equal(torch.stack(blurry["cond"]), torch.stack(blurry["uncond"]))
        assert torch.equal(blurry["cond"][0], dog["cond"][0])  # same noise, same prompt: same first cond feature
        assert not torch.equal(blurry["uncond"][0], dog["uncond"][0])  # the negative prompt reaches the uncond pass
        assert not torch.equal(outs["blurry"], outs["a photo of a dog"])
        assert policies["cond"] is not policies["uncond"]
        assert (policies["cond"].context, policies["uncond"].context) == ("cond", "uncond")
    finally:
        lesa.disable(pipe)


def test_qwen_default_stage_thresholds():
    assert lesa.get_adapter("QwenImageTransformer2DModel").stage_thresholds == (0.9, 0.4)
    assert lesa.get_adapter("FluxTransformer2DModel").stage_thresholds == (0.9, 0.5)


def test_wan_uses_the_step_and_sigma_of_its_cache_context(pipes):
    pipe = pipes["wan"]
    events = []
    runtime = lesa.enable(pipe, lesa.FORAConfig(interval=3, warmup=1))
    runtime.observers.append(lambda e: events.append((e.context, e.step, e.sigma)))
    original = runtime.argument

    def wrong_timestep(name, args, kwargs):  # a timestep argument the runtime must not need
        value = original(name, args, kwargs)
        return torch.full_like(value, 1000.0) if name == "timestep" else value

    runtime.argument = wrong_timestep
    try:
        run(pipe, "wan")
    finally:
        lesa.disable(pipe)
    sigmas = pipe.scheduler.sigmas[:-1].tolist()
    cond = [(s, sg) for c, s, sg in events if c == "cond"]
    assert [s for s, _ in cond] == list(range(STEPS))
    assert [sg for _, sg in cond] == pytest.approx(sigmas)


def test_history_is_kept_in_the_model_dtype_and_only_as_long_as_the_largest_window(pipes):
    pipe = pipes["wan"]
    transformer = pipe.transformer
    try:
        transformer.to(torch.bfloat16)
        received = []
        handle = transformer.norm_out.register_forward_pre_hook(lambda m, a: received.append(a[0].dtype))
        config = lesa.LESAConfig(predictor=predictor(pipe, windows=[2, 3, 3], interval=3, warmup=1))
        runtime = lesa.enable(pipe, config)
        policies = {}
        runtime.observers.append(lambda e: policies.setdefault(e.context, runtime.state_manager.get_state().policy))
        run(pipe, "wan")
        handle.remove()
        policy = policies["cond"]
        assert len(policy.history) == 3  # max(windows), not the predictor's history of 8
        assert {h.dtype for h in policy.history} == {torch.bfloat16}  # Wan hands norm_out an fp32 copy
        assert set(received) == {torch.float32}  # cached steps still give norm_out what it expects
    finally:
        lesa.disable(pipe)
        transformer.to(torch.float32)


def test_a_two_transformer_wan_pipeline_is_refused(pipes):
    pipe = pipes["wan"]
    pipe.register_modules(transformer_2=pipe.transformer)
    try:
        with pytest.raises(ValueError, match="second transformer"):
            lesa.enable(pipe, lesa.FORAConfig())
    finally:
        pipe.register_modules(transformer_2=None)


def test_sd3_by_adapter_entry_alone():
    """The bare transformer, called in a hand-written sampling loop (no pipeline, no cache context)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    transformer = tiny_sd3_pipeline().transformer
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    generator = torch.Generator().manual_seed(0)
    latents0 = torch.randn(1, 4, 8, 8, generator=generator)
    text, pooled = torch.randn(1, 5, 32, generator=generator), torch.randn(1, 32, generator=generator)

    def sample():
        scheduler.set_timesteps(STEPS)
        latents = latents0.clone()
        for t in scheduler.timesteps:
            with torch.no_grad():
                v = transformer(latents, text, pooled, t.reshape(1), return_dict=False)[0]
            latents = scheduler.step(v, t, latents).prev_sample
        return latents

    reference = sample()
    lesa.apply_lesa_cache(transformer, lesa.FORAConfig(interval=1))
    assert torch.equal(sample(), reference)
    lesa.remove_lesa_cache(transformer)
    runtime = lesa.apply_lesa_cache(transformer, lesa.TaylorSeerConfig(interval=3, warmup=1))
    assert not torch.equal(sample(), reference)
    info = runtime.summary()
    assert (info["steps"], info["full_steps"], info["trunk_executions"]) == (STEPS, 4, 4)
    lesa.remove_lesa_cache(transformer)
    assert torch.equal(sample(), reference)


def test_the_hook_coexists_with_model_cpu_offload():
    """accelerate's offload hook (on CPU: device "cpu", so no real moves) and lesa's hooks on one transformer, in
    either order of enabling."""
    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=STEPS, height=16, width=16, output_type="latent", prompt="a cat")
    reference = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    lesa.enable(pipe, lesa.FORAConfig(interval=3, warmup=1))
    cached = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    lesa.disable(pipe)
    pipe.enable_model_cpu_offload(device="cpu")
    assert hasattr(pipe.transformer, "_hf_hook")
    lesa.enable(pipe, lesa.FORAConfig(interval=1))
    assert torch.equal(pipe(generator=torch.Generator().manual_seed(0), **kw).images, reference)
    lesa.enable(pipe, lesa.FORAConfig(interval=3, warmup=1))
    assert torch.equal(pipe(generator=torch.Generator().manual_seed(0), **kw).images, cached)
    assert lesa.summary(pipe)["trunk_executions"] == 4
    lesa.disable(pipe)
    assert torch.equal(pipe(generator=torch.Generator().manual_seed(0), **kw).images, reference)


def test_batched_cfg_is_recorded_per_prompt_in_the_call_layout(tmp_path):
    """SD3 batches [uncond, cond] into one transformer call: a recording keeps both chunks per prompt, and the
    closed-loop targets of a batch of prompts line up with the taps of the batched call."""
    from lesa.record import record
    from lesa.recording import Recording
    from lesa.runtime import get_runtime
    from lesa.training import as_call_batch

    pipe = tiny_sd3_pipeline()
    pipe.set_progress_bar_config(disable=True)
    settings = dict(height=16, width=16, guidance_scale=5.0)
    record(
        pipe,
        ["a red cat", "a blue dog"],
        tmp_path / "rec",
        model="tiny-random-sd3",
        steps=4,
        dtype="float32",
        **settings,
    )
    rec = Recording(tmp_path / "rec")
    assert rec.shapes["default.feature"] == [4, 2, 64, 16]  # steps, (uncond, cond), tokens, width
    data = [rec.load(i) for i in range(2)]
    lesa.enable(pipe, lesa.FORAConfig(interval=1))
    taps = {}
    get_runtime(pipe.transformer).observers.append(lambda e: taps.__setitem__(e.step, e.tap.detach().clone()))
    noise = torch.stack([d["noise"] for d in data])
    pipe(prompt=["a red cat", "a blue dog"], latents=noise, output_type="latent", num_inference_steps=4, **settings)
    targets = torch.stack([d["default.feature"] for d in data], 1)
    for step, tap in taps.items():
        torch.testing.assert_close(as_call_batch(targets[step], tap.dim()), tap, rtol=1e-4, atol=1e-4)
