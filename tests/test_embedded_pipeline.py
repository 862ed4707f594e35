import pytest
import torch

import lesa
from lesa.embedded.loading import load_embedded, new_pipeline, save_shipped
from lesa.embedded.pipeline import image_ids, pack, unpack


@pytest.fixture(scope="module")
def untrained():
    pipe = new_pipeline(seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, steps=12, **kw):
    noise = torch.randn(1, 256, 12, generator=torch.Generator().manual_seed(0))
    return pipe(
        "a small red circle in the top left on a white background",
        num_inference_steps=steps,
        latents=noise,
        output_type="latent",
        **kw,
    ).images


def test_pack_unpack_round_trip_and_ids():
    images = torch.randn(2, 3, 32, 32)
    tokens = pack(images)
    assert tokens.shape == (2, 256, 12)
    assert torch.equal(unpack(tokens, 32, 32), images)
    assert torch.equal(tokens[0, 1], images[0, :, 0:2, 2:4].reshape(12))  # token 1 = the patch at row 0, col 1
    ids = image_ids(32, 32)
    assert ids.shape == (256, 3) and ids[17].tolist() == [0, 1, 1]


def test_the_flux_adapter_serves_the_embedded_pipeline_unchanged(untrained):
    reference = sample(untrained)
    lesa.enable(untrained, lesa.TaylorSeerConfig(interval=1))
    assert torch.allclose(sample(untrained), reference, atol=1e-6, rtol=0)
    lesa.enable(untrained, lesa.FORAConfig(interval=4, warmup=1))
    sample(untrained)
    info = lesa.summary(untrained)
    assert set(info["contexts"]) == {"cond", "uncond"}  # true CFG: two cache contexts, each with its own state
    assert info["contexts"]["uncond"]["full_steps"] == info["full_steps"] == 4  # steps 0, 1, 5, 9 of 12
    lesa.disable(untrained)
    assert torch.equal(sample(untrained), reference)


def test_save_and_load_give_the_same_images(untrained, tmp_path):
    save_shipped(untrained.transformer, tmp_path)
    assert not (tmp_path / "text_encoder").exists()  # MiniLM comes from its package, not from the model folder
    loaded = load_embedded(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert torch.allclose(sample(loaded), sample(untrained), atol=1e-5)  # same weights; kernels may differ in layout
    with pytest.raises(FileNotFoundError, match="holds no embedded model"):
        load_embedded(tmp_path / "scheduler")


def test_negative_prompt_and_guidance_change_the_output(untrained):
    plain = sample(untrained)
    assert not torch.equal(sample(untrained, negative_prompt="a blue square"), plain)
    assert not torch.equal(sample(untrained, guidance_scale=1.0), plain)


def test_fine_tuning_starts_from_the_given_weights(tmp_path):
    """train_model --init: at learning rate 0 the result is the initial model itself (also through the bf16 and
    object-weighted loss path); a checkpoint started from other weights or another schedule is not resumed silently."""
    from lesa.embedded import train_model
    from lesa.embedded.loading import SHIPPED_DIR

    args = ["--out", str(tmp_path / "run"), "--ship", str(tmp_path / "model"), "--steps", "1", "--batch", "2"]
    args += ["--lr", "0", "--lr-min", "0", "--threads", "2"]
    train_model.main([*args, "--init", str(SHIPPED_DIR), "--bf16", "--object-weight", "4"])
    tuned = load_embedded(tmp_path / "model").transformer.state_dict()
    for name, tensor in load_embedded().transformer.state_dict().items():
        torch.testing.assert_close(tuned[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    with pytest.raises(ValueError, match="was started with --init .*, --steps 1, not --init None, --steps 2"):
        train_model.main([*args, "--steps", "2"])
    with pytest.raises(ValueError, match="was started with --lr 0.0, not --lr 0.0001"):
        train_model.main([*args, "--init", str(SHIPPED_DIR), "--bf16", "--object-weight", "4", "--lr", "1e-4"])


def test_object_weights_cover_the_shape_and_its_ring():
    """--object-weight: the shape's pixels and a 1 px ring get the weight, the rest of the canvas 1."""
    import numpy as np

    from lesa.embedded.scenes import Scene, render
    from lesa.embedded.train_model import object_weights

    scenes = [Scene("square", "red", "small", "center", "white"), Scene("circle", "blue", "large", "top left", "black")]
    images = np.stack([render(scene) for scene in scenes])
    weights = object_weights(images, 4.0)
    assert weights.shape == (2, 3, 32, 32)
    assert set(weights.unique().tolist()) == {1.0, 4.0}
    for image, weight in zip(images, weights, strict=True):
        shape = (image != image[0, 0]).any(-1)
        ys, xs = np.nonzero(shape)
        ring = np.zeros_like(shape)
        ring[ys.min() - 1 : ys.max() + 2, xs.min() - 1 : xs.max() + 2] = True  # bounding box grown by 1 px
        heavy = (weight[0] == 4.0).numpy()
        assert heavy[shape].all() and not heavy[~ring].any()
    assert (weights[0, 0] == 4.0).sum() == 9 * 9  # a 7 px square and its ring


def test_caption_features_are_cached_and_equal_to_encoding_afresh(untrained):
    """Training encodes each distinct caption once; the cached rows are those of a fresh batch encoding."""
    from lesa.embedded.pipeline import encode_text
    from lesa.embedded.train_model import CaptionFeatures

    features = CaptionFeatures(untrained.text_encoder, untrained.tokenizer)
    first = ["a red circle", "", "a blue square at the bottom"]
    features(first)
    batch = ["a blue square at the bottom", "a red circle", "a green triangle", "a red circle", ""]
    tokens, pooled = features(batch)
    assert len(features.cache) == 4
    with torch.no_grad():
        fresh_tokens, fresh_pooled = encode_text(untrained.text_encoder, untrained.tokenizer, batch)
    torch.testing.assert_close(tokens, fresh_tokens, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, fresh_pooled, rtol=0, atol=1e-6)
