"""Tiny random-weight diffusers pipelines built from configs (no downloads), for capture tests.

Text encoders and tokenizers are left out: tests pass prompt_embeds directly.
"""
from __future__ import annotations

import torch


def tiny_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 8], in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=4)


def tiny_sd(seed: int = 0):
    """StableDiffusionPipeline with a 2-level UNet (cross attention at two resolutions)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=4)
    pipe = StableDiffusionPipeline(vae=tiny_vae(), text_encoder=None, tokenizer=None, unet=unet,
                                   scheduler=DDIMScheduler(clip_sample=False, steps_offset=1, set_alpha_to_one=False), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_inputs(batch: int = 1, text_len: int = 7, height: int = 40, width: int = 56, steps: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(batch, text_len, 16, generator=g),
                negative_prompt_embeds=torch.randn(batch, text_len, 16, generator=g),
                height=height, width=width, num_inference_steps=steps, guidance_scale=5.0,
                generator=torch.Generator().manual_seed(seed), output_type="pt")


def tiny_sdxl(seed: int = 0):
    """StableDiffusionXLPipeline: text_time conditioning, two transformer layers in the deeper block."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=8 * 6 + 12,
        cross_attention_dim=16, norm_num_groups=4)
    pipe = StableDiffusionXLPipeline(vae=tiny_vae(), text_encoder=None, text_encoder_2=None, tokenizer=None,
                                     tokenizer_2=None, unet=unet, scheduler=EulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sdxl_inputs(height: int = 48, width: int = 32, steps: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(prompt_embeds=torch.randn(1, 9, 16, generator=g), negative_prompt_embeds=torch.randn(1, 9, 16, generator=g),
                pooled_prompt_embeds=torch.randn(1, 12, generator=g),
                negative_pooled_prompt_embeds=torch.randn(1, 12, generator=g), height=height, width=width,
                num_inference_steps=steps, guidance_scale=5.0, generator=torch.Generator().manual_seed(seed),
                output_type="pt")
