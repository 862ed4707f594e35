"""Tiny pipelines of the real diffusers classes with random weights, built in code (offline): plumbing, not pictures.

`lesa.pipelines.load_pipeline` builds them by name (`TINY_MODELS`, e.g. "tiny-random-flux"); the tests and the CLI's
offline default use them. Each exercises the workflow of its class without weights to download, but draws noise.
"""

from __future__ import annotations

import torch

from ..pipelines import TINY_MODEL


def tiny_flux_pipeline(seed: int = 0):
    """A FluxPipeline of the real diffusers classes with tiny random components (~0.3 M params), built offline.

    Example:
        >>> pipe = tiny_flux_pipeline()
        >>> pipe("a red circle", num_inference_steps=2, height=16, width=16, output_type="latent").images.shape
        torch.Size([1, 64, 4])
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        pooled_projection_dim=32,
        axes_dims_rope=(4, 4, 8),
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=1000,
            projection_dim=32,
            hidden_act="gelu",
        )
    )
    torch.manual_seed(seed + 2)
    text_encoder_2 = T5EncoderModel(
        T5Config(vocab_size=1000, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4, decoder_start_token_id=0)
    )
    torch.manual_seed(seed + 3)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4,),
        layers_per_block=1,
        latent_channels=1,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer(model_max_length=77),
        text_encoder_2=text_encoder_2,
        tokenizer_2=T5Tokenizer(model_max_length=512),
        transformer=transformer,
    )
    for component in (transformer, text_encoder, text_encoder_2, vae):
        component.eval()
    return pipe


_QWEN_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)
_HUNYUAN_TEMPLATE = (
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video.2. The color, shape, size, texture, quantity, text, and spatial "
    "relationships of the objects.3. Actions, events, behaviors temporal relationships, physical movement changes of "
    "the objects.4. background environment, light, style and atmosphere.5. camera angles, movements, and transitions "
    "used in the video:<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n"
)


def tiny_tokenizer(template: str = "", specials: tuple[str, ...] = (), max_length: int = 512):
    """A fast WordPiece tokenizer built in code: the words of `template` are single tokens (so a pipeline's prompt
    template has about the token count its `crop_start` / drop index expects) and any other word splits into
    characters (so different prompts give different tokens).

    Example:
        >>> tiny_tokenizer("describe the image:").tokenize("describe the image: a cat")
        ['describe', 'the', 'image', ':', 'a', 'c', '##a', '##t']
    """
    import re

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)]
    words = sorted(set(re.findall(r"\w+|[^\w\s]", template)))
    vocab: dict[str, int] = {}
    for token in ("<pad>", "<unk>", "<s>", "</s>", *specials, *chars, *("##" + c for c in chars), *words):
        vocab.setdefault(token, len(vocab))
    backend = Tokenizer(models.WordPiece(vocab, unk_token="<unk>", max_input_chars_per_word=100))
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=max_length,
        additional_special_tokens=list(specials),
    )


def _eval(pipe, *components):
    for component in components:
        component.eval()
    return pipe


def tiny_qwenimage_pipeline(seed: int = 0):
    """A QwenImagePipeline (true CFG with a negative prompt) of the real classes with tiny random components.

    Example:
        >>> pipe = tiny_qwenimage_pipeline()
        >>> pipe("a red circle", negative_prompt="blurry", true_cfg_scale=4.0, num_inference_steps=2, height=32,
        ...      width=32, output_type="latent").images.shape
        torch.Size([1, 16, 16])
    """
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=16,
        out_channels=4,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=16,
        axes_dims_rope=(8, 4, 4),
    )
    tokenizer = tiny_tokenizer(_QWEN_TEMPLATE, ("<|im_start|>", "<|im_end|>", "\n"), max_length=1024)
    torch.manual_seed(seed + 1)
    text_config = dict(
        hidden_size=16,
        intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        rope_scaling={"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"},
        rope_theta=1000000.0,
        bos_token_id=2,
        eos_token_id=3,
    )
    vision_config = dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16)
    text_encoder = Qwen2_5_VLForConditionalGeneration(
        Qwen2_5_VLConfig(
            text_config=text_config,
            vision_config=vision_config,
            vocab_size=len(tokenizer),
            bos_token_id=2,
            eos_token_id=3,
        )
    )
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLQwenImage(
        base_dim=24,
        z_dim=4,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        temperal_downsample=[False, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
    )
    return _eval(pipe, transformer, text_encoder, vae)


def tiny_hunyuanvideo_pipeline(seed: int = 0):
    """A HunyuanVideoPipeline of the real classes with tiny random components (Llama + CLIP text encoders).

    Example:
        >>> pipe = tiny_hunyuanvideo_pipeline()
        >>> pipe("a red circle", num_inference_steps=2, height=16, width=16, num_frames=5,
        ...      output_type="latent").frames.shape
        torch.Size([1, 4, 2, 2, 2])
    """
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, LlamaConfig, LlamaModel

    torch.manual_seed(seed)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=4,
        out_channels=4,
        num_attention_heads=2,
        attention_head_dim=10,
        num_layers=1,
        num_single_layers=2,
        num_refiner_layers=1,
        patch_size=1,
        patch_size_t=1,
        guidance_embeds=True,
        text_embed_dim=16,
        pooled_projection_dim=8,
        rope_axes_dim=(2, 4, 4),
    )
    specials = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
    tokenizer = tiny_tokenizer(_HUNYUAN_TEMPLATE, specials, max_length=512)
    torch.manual_seed(seed + 1)
    text_encoder = LlamaModel(
        LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=16,
            intermediate_size=37,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=4,
            pad_token_id=0,
        )
    )
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModel(
        CLIPTextConfig(
            bos_token_id=0,
            eos_token_id=2,
            pad_token_id=1,
            hidden_size=8,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=1000,
            projection_dim=32,
            hidden_act="gelu",
        )
    )
    torch.manual_seed(seed + 3)
    vae = AutoencoderKLHunyuanVideo(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        layers_per_block=1,
        act_fn="silu",
        norm_num_groups=4,
        scaling_factor=0.476986,
        spatial_compression_ratio=8,
        temporal_compression_ratio=4,
        mid_block_add_attention=True,
    )
    pipe = HunyuanVideoPipeline(
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
        text_encoder_2=text_encoder_2,
        tokenizer_2=CLIPTokenizer(model_max_length=77),
    )
    return _eval(pipe, transformer, text_encoder, text_encoder_2, vae)


def tiny_wan_pipeline(seed: int = 0):
    """A WanPipeline (Wan 2.1 layout: one transformer) of the real classes with tiny random components.

    Example:
        >>> pipe = tiny_wan_pipeline()
        >>> pipe("a red circle", num_inference_steps=2, height=16, width=16, num_frames=5, max_sequence_length=16,
        ...      output_type="latent").frames.shape
        torch.Size([1, 16, 2, 2, 2])
    """
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(seed)
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=16,
        out_channels=16,
        text_dim=32,
        freq_dim=256,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        rope_max_seq_len=32,
    )
    tokenizer = tiny_tokenizer(max_length=512)
    torch.manual_seed(seed + 1)
    text_encoder = UMT5EncoderModel(
        UMT5Config(vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    )
    torch.manual_seed(seed + 2)
    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    )
    pipe = WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        transformer=transformer,
        vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    return _eval(pipe, transformer, text_encoder, vae)


def tiny_sd3_pipeline(seed: int = 0):
    """A StableDiffusion3Pipeline (two CLIP encoders + T5, CFG) of the real classes with tiny random components.

    Example:
        >>> pipe = tiny_sd3_pipeline()
        >>> pipe("a red circle", num_inference_steps=2, height=16, width=16, max_sequence_length=16,
        ...      output_type="latent").images.shape
        torch.Size([1, 4, 8, 8])
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=16,
        patch_size=1,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        caption_projection_dim=16,
        joint_attention_dim=32,  # T5 width; the two CLIPs' 16 + 16 are padded to it
        pooled_projection_dim=32,  # the two CLIPs' pooled 16 + 16
        out_channels=4,
    )
    clip_config = CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        hidden_size=16,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        projection_dim=16,
        hidden_act="gelu",
    )
    torch.manual_seed(seed + 1)
    text_encoder = CLIPTextModelWithProjection(clip_config)
    torch.manual_seed(seed + 2)
    text_encoder_2 = CLIPTextModelWithProjection(clip_config)
    tokenizer_3 = tiny_tokenizer(max_length=256)
    torch.manual_seed(seed + 3)
    text_encoder_3 = T5EncoderModel(
        T5Config(vocab_size=len(tokenizer_3), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4)
    )
    torch.manual_seed(seed + 4)
    vae = AutoencoderKL(
        sample_size=32,
        in_channels=3,
        out_channels=3,
        block_out_channels=(4, 4),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=1,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,
        scaling_factor=1.5035,
    )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=CLIPTokenizer(model_max_length=77),
        text_encoder_2=text_encoder_2,
        tokenizer_2=CLIPTokenizer(model_max_length=77),
        text_encoder_3=text_encoder_3,
        tokenizer_3=tokenizer_3,
    )
    return _eval(pipe, transformer, text_encoder, text_encoder_2, text_encoder_3, vae)


# the names `load_pipeline` builds them by
TINY_MODELS = {
    TINY_MODEL: tiny_flux_pipeline,
    "tiny-random-qwenimage": tiny_qwenimage_pipeline,
    "tiny-random-hunyuanvideo": tiny_hunyuanvideo_pipeline,
    "tiny-random-wan": tiny_wan_pipeline,
    "tiny-random-sd3": tiny_sd3_pipeline,
}
