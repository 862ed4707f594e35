"""torch.compile with lesa on: regional and whole-model compilation give the eager lesa output and counts, FLOPs are
counted outside compiled code, and a `torch.compile`d transformer can be enabled.

The backend is dynamo's CompileCounter: it counts the graphs dynamo compiles and runs them as FX graphs (the same ops
in the same order, so outputs match eager to the bit here; the tolerance is 1e-6), with no C++ compiler.
"""

import pytest
import torch
from conftest import generate, tiny_predictor
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

import lesa
from lesa.testing import tiny_flux_pipeline

STEPS = 8  # interval 3, warm-up 3: full steps 0-3 and 6, cached 4, 5 and 7


@pytest.fixture
def fresh():
    """A new tiny pipeline (compiling changes it for good), and dynamo's caches cleared: compiled code is kept per
    code object and shared by every instance of a class, so each test counts only the graphs it compiles."""
    torch._dynamo.reset()
    pipe = tiny_flux_pipeline()
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    torch._dynamo.reset()


def lesa_config(pipe) -> lesa.LESAConfig:
    pipe.scheduler.set_timesteps(STEPS)
    sigmas = pipe.scheduler.sigmas.tolist()
    predictor = tiny_predictor(num_steps=STEPS, sigmas=sigmas, feature_dim=pipe.transformer.inner_dim, interval=3)
    return lesa.LESAConfig(predictor=predictor)


def eager(pipe, config) -> tuple[torch.Tensor, dict]:
    lesa.enable(pipe, config)
    out, info = generate(pipe, steps=STEPS), lesa.summary(pipe)
    lesa.disable(pipe)
    return out, info


def test_regional_compile_compiles_the_blocks_with_flops_counted(fresh):
    pipe = fresh
    config = lesa_config(pipe)
    assert config.count_flops
    reference, info = eager(pipe, config)
    counter = CompileCounter()
    lesa.enable(pipe, config)
    pipe.transformer.compile_repeated_blocks(backend=counter)
    out = generate(pipe, steps=STEPS)
    # the counted first calls run eagerly: under the counter's dispatch mode dynamo would skip the blocks for good
    assert counter.frame_count > 0
    assert torch.allclose(out, reference, atol=1e-6, rtol=0)
    assert lesa.summary(pipe) == info  # the same steps, trunk executions and counted FLOPs
    graphs = counter.frame_count
    assert torch.allclose(generate(pipe, steps=STEPS), reference, atol=1e-6, rtol=0)
    assert counter.frame_count == graphs  # the next generation runs the graphs already compiled


def test_whole_model_compile_gives_the_eager_output(fresh):
    pipe = fresh
    config = lesa_config(pipe)
    reference, info = eager(pipe, config)
    counter = CompileCounter()
    counters.clear()
    lesa.enable(pipe, config)
    pipe.transformer.compile(backend=counter)
    out = generate(pipe, steps=STEPS)
    assert counter.frame_count > 0
    assert torch.allclose(out, reference, atol=1e-6, rtol=0)
    assert lesa.summary(pipe) == info
    # every graph break is one of lesa's compiler-disabled boundaries (the root hook's bookkeeping, the tap's
    # exchange with the policy): none from FLOP counting, `.item()` or `.tolist()`
    reasons = list(counters["graph_break"])
    assert reasons and all("disable" in reason for reason in reasons), reasons


MAX_GRAPHS = 8  # a bound independent of the step count (4 graphs here: full and cached step, before and after breaks)


@pytest.mark.parametrize("how", ["compile", "compile_repeated_blocks"])
@pytest.mark.parametrize("method", ["fora", "lesa"])
def test_compile_does_not_recompile_per_step(fresh, how, method):
    """The trunk hooks only set a flag inside compiled code (the root hook's compiler-disabled `_end` counts the
    blocks), so nothing dynamo guards on changes from step to step: longer generations, with more full and cached
    steps than dynamo has seen, run the graphs already compiled, and the counts stay those of eager."""
    pipe = fresh
    steps = [STEPS, STEPS + 4, 3 * STEPS]
    if method == "lesa":
        config = lesa_config(pipe)
        steps = [STEPS, STEPS]  # a predictor serves the step count it was trained for
    else:
        config = lesa.FORAConfig(interval=3)
    lesa.enable(pipe, config)
    expected = []
    for n in steps:
        generate(pipe, steps=n)
        expected.append(lesa.summary(pipe))
    lesa.disable(pipe)
    counter = CompileCounter()
    lesa.enable(pipe, config)
    getattr(pipe.transformer, how)(backend=counter)
    graphs = []
    # a frame past dynamo's recompile limit would silently run eagerly: an error here instead
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for n, summary in zip(steps, expected, strict=True):
            generate(pipe, steps=n)
            assert lesa.summary(pipe) == summary  # the same full steps, trunk executions and counted FLOPs as eager
            graphs.append(counter.frame_count)
    assert 0 < graphs[0] <= MAX_GRAPHS
    assert graphs == [graphs[0]] * len(steps), graphs  # no graph compiled after the first generation


def test_a_torch_compiled_transformer_can_be_enabled(fresh):
    pipe = fresh
    config = lesa_config(pipe)
    plain = generate(pipe, steps=STEPS)
    reference, info = eager(pipe, config)
    counter = CompileCounter()
    pipe.transformer = torch.compile(pipe.transformer, backend=counter)
    assert torch.allclose(generate(pipe, steps=STEPS), plain, atol=1e-6, rtol=0)  # compiled before lesa is on
    runtime = lesa.enable(pipe, config)
    assert pipe.transformer._orig_mod._lesa_runtime is runtime  # the hooks are on the module the wrapper calls
    assert torch.allclose(generate(pipe, steps=STEPS), reference, atol=1e-6, rtol=0)
    assert lesa.summary(pipe) == info
    assert counter.frame_count > 0
    lesa.disable(pipe)
    assert torch.allclose(generate(pipe, steps=STEPS), plain, atol=1e-6, rtol=0)
    assert not hasattr(pipe.transformer._orig_mod, "_lesa_runtime")
