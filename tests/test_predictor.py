import json

import pytest
import torch
from conftest import SIGMAS, tiny_predictor
from safetensors.torch import load_file, save_file

from lesa.predictor import LESAPredictor, PredictorConfig, pad_window, stage_of


def test_stage_routing_at_the_thresholds():
    th = (0.9, 0.5)
    assert stage_of(1.0, th) == 0
    assert stage_of(0.9000001, th) == 0
    assert stage_of(0.9, th) == 1  # t <= 0.9 leaves stage 0
    assert stage_of(0.5000001, th) == 1
    assert stage_of(0.5, th) == 2
    assert stage_of(0.0, th) == 2
    assert stage_of(0.45, (0.9, 0.4)) == 1  # Qwen-Image's threshold


def test_expert_choice_follows_sigma_and_context():
    p = tiny_predictor(contexts=["cond", "uncond"])
    assert p.expert("cond", 0.95) is p.experts["cond"][0]
    assert p.expert("cond", 0.7) is p.experts["cond"][1]
    assert p.expert("uncond", 0.2) is p.experts["uncond"][2]
    assert p.expert("default", 0.2) is p.experts["cond"][2]  # unknown context: first trained one


def test_window_uses_only_the_last_k_features():
    p = tiny_predictor()
    with torch.no_grad():  # the filters start as a first difference; make every tap count
        for expert in p.experts["cond"]:
            expert.mix.weight.normal_()
    sig = torch.tensor(SIGMAS)
    hist = [torch.randn(3, 6) for _ in range(8)]
    changed = [torch.randn(3, 6) for _ in range(4)] + hist[4:]
    step0 = 1  # sigma 0.95 -> stage 0, K = 4: the four oldest entries do not matter
    assert torch.equal(p.forecast(hist, "cond", step0, sig), p.forecast(changed, "cond", step0, sig))
    step1 = 5  # sigma 0.75 -> stage 1, K = 8: they do
    assert not torch.equal(p.forecast(hist, "cond", step1, sig), p.forecast(changed, "cond", step1, sig))


def test_short_history_is_left_padded_with_the_oldest():
    a, b = torch.zeros(2), torch.ones(2)
    assert pad_window([a, b], 4) == [a, a, a, b]
    assert pad_window([a, b, a, b, a], 3) == [a, b, a]
    with pytest.raises(ValueError, match="empty"):
        pad_window([], 4)


def test_forecast_is_last_plus_alpha_times_filter():
    p = tiny_predictor()
    sig = torch.tensor(SIGMAS)
    hist = [torch.randn(3, 6) for _ in range(8)]
    step = 12
    expert = p.expert("cond", SIGMAS[step])
    alpha = expert.alpha(SIGMAS[step], sig)
    z = sum(expert.mix.weight[0, k] * h for k, h in enumerate(hist[-expert.window :])) + expert.mix.bias[0]
    assert torch.allclose(p.forecast(hist, "cond", step, sig), hist[-1] + alpha * z, atol=1e-6)


def test_inference_table_matches_training_forecast_and_keeps_dtype():
    p = tiny_predictor()
    sig = torch.tensor(SIGMAS)
    hist = [torch.randn(3, 6) for _ in range(8)]
    table = p.coefficient_table("cond", SIGMAS)
    for step in (1, 7, 15):
        coeffs, offset = table[step]
        fast = LESAPredictor.apply_coefficients(hist, coeffs, offset)
        assert torch.allclose(fast, p.forecast(hist, "cond", step, sig), atol=1e-5)
    bf16 = [h.bfloat16() for h in hist]
    assert LESAPredictor.apply_coefficients(bf16, *table[3]).dtype == torch.bfloat16


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    p = tiny_predictor(seed=3)
    p.save_pretrained(tmp_path, card="# card\n")
    assert {f.name for f in tmp_path.iterdir()} == {"config.json", "model.safetensors", "README.md"}
    config = json.loads((tmp_path / "config.json").read_text())
    for key in (
        "model_class",
        "tap",
        "num_steps",
        "sigmas",
        "interval",
        "warmup",
        "thresholds",
        "windows",
        "feature_dim",
        "dtype",
    ):
        assert key in config
    q = LESAPredictor.from_pretrained(tmp_path)
    sig = torch.tensor(SIGMAS)
    hist = [torch.randn(3, 6) for _ in range(8)]
    for step in range(20):
        assert torch.equal(p.forecast(hist, "cond", step, sig), q.forecast(hist, "cond", step, sig))
    assert all(v.dtype == torch.float32 for v in load_file(tmp_path / "model.safetensors").values())


def test_schedule_length_mismatch_is_refused():
    p = tiny_predictor()
    with pytest.raises(ValueError, match=r"21 values \(20 steps\).*31 values"):
        p.coefficient_table("cond", [1 - i / 30 for i in range(31)])


def test_bad_predictor_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LESAPredictor.from_pretrained(tmp_path / "nope")
    tiny_predictor().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        LESAPredictor.from_pretrained(tmp_path)
    weights.write_bytes(good)
    state = load_file(weights)
    state[next(iter(state))] = state[next(iter(state))].fill_(float("nan"))
    save_file(state, weights)
    with pytest.raises(ValueError, match="NaN or inf"):
        LESAPredictor.from_pretrained(tmp_path)
    weights.write_bytes(good)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "kan_hidden": [4, 4]}))
    with pytest.raises(ValueError, match="has shape"):
        LESAPredictor.from_pretrained(tmp_path)
    del config["feature_dim"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"missing required field\(s\) \['feature_dim'\]"):
        LESAPredictor.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        LESAPredictor.from_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        LESAPredictor.from_pretrained(tmp_path)


def test_config_validation():
    with pytest.raises(ValueError, match="3 stages"):
        tiny_predictor(windows=[4, 8])
    with pytest.raises(ValueError, match="decrease"):
        tiny_predictor(thresholds=[0.5, 0.9])
    with pytest.raises(ValueError, match="history"):
        tiny_predictor(windows=[4, 8, 9])


@pytest.mark.parametrize("gain", ["kan", "mlp"])
def test_ablation_variants_one_expert_and_mlp_gain_start_at_the_first_difference(tmp_path, gain):
    p = tiny_predictor(thresholds=[], windows=[8], gain=gain)
    assert len(p.experts["cond"]) == 1
    history = [torch.randn(3, 6) for _ in range(5)]
    out = p.forecast(history, "cond", 7, torch.tensor(SIGMAS))
    if gain == "mlp":  # zero last layer: the gain is exactly 0, so the forecast is reuse
        torch.testing.assert_close(out, history[-1])
    p.save_pretrained(tmp_path / gain)
    q = LESAPredictor.from_pretrained(tmp_path / gain)
    assert q.config.gain == gain
    torch.testing.assert_close(q.forecast(history, "cond", 7, torch.tensor(SIGMAS)), out)
    with pytest.raises(ValueError, match="gain"):
        tiny_predictor(gain="rnn")


def test_coefficient_table_is_reused_until_a_weight_changes():
    torch.manual_seed(0)
    sigmas = torch.linspace(1, 0, 11)
    config = PredictorConfig(
        model_class="FluxTransformer2DModel",
        tap="t",
        num_steps=10,
        sigmas=sigmas.tolist(),
        feature_dim=4,
        kan_hidden=[4],
        interval=3,
        warmup=1,
    )
    predictor = LESAPredictor(config)
    first = predictor.coefficient_table("cond", sigmas)
    assert predictor.coefficient_table("cond", sigmas) is first  # the same schedule: computed once
    with torch.no_grad():
        predictor.experts["cond"][0].mix.weight.mul_(2.0)  # an in-place update, as an optimiser step makes
    second = predictor.coefficient_table("cond", sigmas)
    assert second is not first and second != first
    other = predictor.coefficient_table("cond", torch.linspace(1, 0.1, 11))
    assert other != second and predictor.coefficient_table("cond", sigmas) == second


def test_saved_files_get_the_usual_permissions(tmp_path):
    import os
    import stat

    sigmas = torch.linspace(1, 0, 11).tolist()
    config = PredictorConfig(model_class="M", tap="t", num_steps=10, sigmas=sigmas, feature_dim=4, kan_hidden=[4])
    LESAPredictor(config).save_pretrained(tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    for name in ("config.json", "model.safetensors"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o666 & ~umask, name


def test_seed_ensemble_averages_the_members_coefficients(tmp_path):
    """An ensemble's folded coefficients (hence its forecasts) are the mean of its members'; it survives a save and
    load; an ensemble of one is the predictor itself; members of different configs are refused."""
    sig = torch.tensor(SIGMAS)
    members = [tiny_predictor(seed, step_filters=True, memory="full", interval=4, warmup=2) for seed in range(3)]
    with torch.no_grad():  # nonzero gains, biases and step filters, different in each member
        for m in members:
            for p in m.parameters():
                p.add_(0.1 * torch.randn_like(p))
    pair = LESAPredictor.ensemble(members[:2])
    trio = LESAPredictor.ensemble([pair, members[2]])
    assert (pair.config.members, trio.config.members) == (2, 3)
    hist = [torch.randn(3, 6) for _ in range(8)]
    for step in (2, 5, 9, 17):
        expected = torch.stack([m.forecast(hist, "cond", step, sig) for m in members]).mean(0)
        assert torch.allclose(trio.forecast(hist, "cond", step, sig), expected, atol=1e-5)
        table = trio.coefficient_table("cond", sig)[step]
        assert torch.allclose(LESAPredictor.apply_coefficients(hist, *table), expected, atol=1e-5)
    trio.save_pretrained(tmp_path / "ens")
    loaded = LESAPredictor.from_pretrained(tmp_path / "ens")
    assert loaded.config.members == 3
    assert torch.equal(loaded.forecast(hist, "cond", 9, sig), trio.forecast(hist, "cond", 9, sig))
    one = LESAPredictor.ensemble(members[:1])
    assert one.config.members == 1 and set(one.state_dict()) == set(members[0].state_dict())
    assert torch.equal(one.forecast(hist, "cond", 9, sig), members[0].forecast(hist, "cond", 9, sig))
    with pytest.raises(ValueError, match=r"differs from predictor 0 in \['interval'\]"):
        LESAPredictor.ensemble([members[0], tiny_predictor(0, step_filters=True, memory="full", interval=5, warmup=2)])
    with pytest.raises(ValueError, match="at least one"):
        LESAPredictor.ensemble([])
