"""Save a FluxPipeline with FLUX.1-dev's transformer widths (1 double + 1 single block, 545.5 M parameters), tiny
CLIP (768) / T5 (4096) encoders, a 16-channel 4-level VAE (factor 8) and FLUX.1-dev's dynamic-shifting scheduler,
random weights, to a directory that `lesa record/train --model DIR` load: the real-scale memory measurements of
docs/real-scale.md ("Measured: lesa record / train at FLUX.1-dev widths").

    python benchmarks/flux_width_pipeline.py runs/flux-width
"""

import sys

import torch
from compile_speed import FLUX_DEV_SCHEDULER, FLUX_DEV_WIDTHS  # the widths and scheduler config, defined once
from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, T5Config, T5EncoderModel, T5Tokenizer

torch.manual_seed(0)
transformer = FluxTransformer2DModel(**FLUX_DEV_WIDTHS, num_layers=1, num_single_layers=1)
clip = CLIPTextModel(
    CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        hidden_size=768,
        intermediate_size=256,
        num_attention_heads=4,
        num_hidden_layers=1,
        vocab_size=1000,
        projection_dim=768,
        hidden_act="gelu",
    )
)
t5 = T5EncoderModel(
    T5Config(vocab_size=1000, d_model=4096, d_kv=64, d_ff=256, num_layers=1, num_heads=4, decoder_start_token_id=0)
)
vae = AutoencoderKL(
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 8, 8, 8),
    layers_per_block=1,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=16,
    norm_num_groups=4,
    use_quant_conv=False,
    use_post_quant_conv=False,
    shift_factor=0.1159,
    scaling_factor=0.3611,
)
sched = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
pipe = FluxPipeline(
    scheduler=sched,
    vae=vae,
    text_encoder=clip,
    tokenizer=CLIPTokenizer(model_max_length=77),
    text_encoder_2=t5,
    tokenizer_2=T5Tokenizer(model_max_length=512),
    transformer=transformer,
)
pipe.save_pretrained(sys.argv[1])
print(sum(p.numel() for p in transformer.parameters()) / 1e6, "M transformer params")
