"""Tiny random-weight diffusion-transformer pipelines built from configs (no downloads, CPU, seconds).

Text encoders and tokenizers are left out (None): pass the prompt embeddings the *_inputs helpers
make. Every builder seeds torch first, so two calls with the same seed give the same weights.
Sizes are picked so token grids are not square (catches h/w swaps) and, for Wan, so that pooling
factors of 2 do not divide the (t, h, w) video grid.

    builder             denoiser(s)                                      token layout of one call
    tiny_sd3            SD3Transformer2DModel, patch 2                   joint [image 8x12, text 7]
    tiny_sd3(dual=True) + dual attention in block 0 (SD3.5)              attn2: [image] -> [image]
    tiny_flux           FluxTransformer2DModel, 1 double + 1 single      [text 7, image 8x12]
    tiny_wan            WanTransformer3DModel (T2V), 9 frames 48x80      [video 3x3x5]; attn2 -> text 6
    tiny_wan(two=True)  Wan 2.2: transformer + transformer_2 (boundary_ratio)
    tiny_wan_i2v        WanImageToVideoPipeline + a tiny CLIP vision tower  attn2 -> image_ctx 17, text 512
    tiny_wan_ti2v       Wan 2.2 TI2V-style (expand_timesteps): per-token timesteps, 0 on the image frame
"""
from __future__ import annotations

import torch

SD3_TEXT, FLUX_TEXT, WAN_TEXT = 7, 7, 6
WAN_I2V_TEXT = 512  # WanAttnProcessor splits the I2V context at a hard-coded 512 text tokens


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def tiny_vae_kl(latent_channels: int = 4):
    """AutoencoderKL with two levels (latent = image / 2) and the shift factor SD3 and Flux read."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=[8, 8], in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                         norm_num_groups=4, layers_per_block=1, shift_factor=0.0609, scaling_factor=1.5035,
                         use_quant_conv=False, use_post_quant_conv=False)


# ----------------------------------------------------------------------------------------- SD3
def tiny_sd3(seed: int = 0, dual: bool = False):
    """StableDiffusion3Pipeline; two joint blocks, the last context_pre_only. dual=True adds SD3.5's
    second (image-only) attention in block 0 and RMS q/k norms."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=24, out_channels=4,
        pos_embed_max_size=32, dual_attention_layers=(0,) if dual else (), qk_norm="rms_norm" if dual else None)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(),
                                    vae=tiny_vae_kl(4), text_encoder=None, tokenizer=None, text_encoder_2=None,
                                    tokenizer_2=None, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_inputs(batch: int = 1, height: int = 32, width: int = 48, steps: int = 2, guidance_scale: float = 5.0,
               seed: int = 0) -> dict:
    """32x48 image -> 16x24 latent -> 8x12 image tokens (patch 2), then 7 text tokens."""
    g = _gen(seed)
    return dict(prompt_embeds=torch.randn(batch, SD3_TEXT, 32, generator=g),
                negative_prompt_embeds=torch.randn(batch, SD3_TEXT, 32, generator=g),
                pooled_prompt_embeds=torch.randn(batch, 24, generator=g),
                negative_pooled_prompt_embeds=torch.randn(batch, 24, generator=g),
                height=height, width=width, num_inference_steps=steps, guidance_scale=guidance_scale,
                generator=_gen(seed), output_type="pt")


# ----------------------------------------------------------------------------------------- Flux
def tiny_flux(seed: int = 0):
    """FluxPipeline with one double-stream and one single-stream block (no guidance embedding)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                         attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                         pooled_projection_dim=24, guidance_embeds=False, axes_dims_rope=(4, 4, 8))
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae_kl(4), text_encoder=None,
                        tokenizer=None, text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def flux_inputs(height: int = 32, width: int = 48, steps: int = 2, true_cfg: bool = False, seed: int = 0) -> dict:
    """32x48 image -> 16x24 latent -> 8x12 packed image tokens, after 7 text tokens. true_cfg=True adds
    negative embeddings and true_cfg_scale: Flux then calls the transformer twice per step."""
    g = _gen(seed)
    out = dict(prompt_embeds=torch.randn(1, FLUX_TEXT, 32, generator=g),
               pooled_prompt_embeds=torch.randn(1, 24, generator=g), height=height, width=width,
               num_inference_steps=steps, generator=_gen(seed), output_type="pt")
    if true_cfg:
        out.update(negative_prompt_embeds=torch.randn(1, FLUX_TEXT, 32, generator=g),
                   negative_pooled_prompt_embeds=torch.randn(1, 24, generator=g), true_cfg_scale=4.0)
    return out


# ----------------------------------------------------------------------------------------- Wan
def tiny_wan_vae():
    from diffusers import AutoencoderKLWan

    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True])


def tiny_wan_transformer(in_channels: int = 16, image_dim: int | None = None):
    """image_dim set: Wan 2.1 I2V, whose attn2 also attends to the image context through add_k/v_proj
    (added_kv_proj_dim = the model width, as in the released I2V configs)."""
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                 in_channels=in_channels, out_channels=16, text_dim=32, freq_dim=256, ffn_dim=32,
                                 num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads",
                                 rope_max_seq_len=32, image_dim=image_dim,
                                 added_kv_proj_dim=None if image_dim is None else 2 * 12)


def tiny_wan(seed: int = 0, two: bool = False):
    """WanPipeline (text-to-video). two=True: Wan 2.2 with transformer_2 for the low-noise steps."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    torch.manual_seed(seed)
    vae = tiny_wan_vae()
    transformer = tiny_wan_transformer()
    transformer_2 = tiny_wan_transformer() if two else None
    pipe = WanPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                       transformer=transformer, transformer_2=transformer_2, boundary_ratio=0.9 if two else None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_inputs(height: int = 48, width: int = 80, num_frames: int = 9, steps: int = 2, guidance_scale: float = 5.0,
               text_len: int = WAN_TEXT, seed: int = 0) -> dict:
    """9 frames 48x80 -> latent 3x6x10 -> patch (1, 2, 2) -> a 3x3x5 video token grid (45 tokens).
    guidance_scale > 1: Wan calls the denoiser once with the prompt, then once with the negative."""
    g = _gen(seed)
    return dict(prompt_embeds=torch.randn(1, text_len, 32, generator=g),
                negative_prompt_embeds=torch.randn(1, text_len, 32, generator=g),
                height=height, width=width, num_frames=num_frames, num_inference_steps=steps,
                guidance_scale=guidance_scale, generator=_gen(seed), output_type="pt")


def tiny_wan_i2v(seed: int = 0):
    """WanImageToVideoPipeline (Wan 2.1 I2V): image context from a tiny CLIP vision tower (17 tokens of
    width 4: 16x16 image, patch 4, + class token), the first frame VAE-encoded as condition."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline
    from transformers import CLIPVisionConfig, CLIPVisionModel

    try:
        from transformers import CLIPImageProcessorPil as ImageProcessor
    except ImportError:  # older transformers
        from transformers import CLIPImageProcessor as ImageProcessor

    torch.manual_seed(seed)
    vae = tiny_wan_vae()
    transformer = tiny_wan_transformer(in_channels=36, image_dim=4)  # 16 noise + 4 mask + 16 condition
    encoder = CLIPVisionModel(CLIPVisionConfig(hidden_size=4, projection_dim=4, num_hidden_layers=2,
                                               num_attention_heads=2, image_size=16, intermediate_size=8,
                                               patch_size=4)).eval()
    processor = ImageProcessor(crop_size=16, size={"shortest_edge": 16})
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=vae,
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), image_processor=processor,
                                   image_encoder=encoder, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_i2v_inputs(steps: int = 2, seed: int = 0, **kw) -> dict:
    """wan_inputs with a 512-token text context and a random 48x80 RGB image."""
    import PIL.Image

    g = _gen(seed + 1)
    pixels = (torch.rand(48, 80, 3, generator=g) * 255).to(torch.uint8).numpy()
    return dict(wan_inputs(steps=steps, text_len=WAN_I2V_TEXT, seed=seed, **kw), image=PIL.Image.fromarray(pixels))


def tiny_wan_ti2v(seed: int = 0):
    """Wan 2.2 TI2V-style WanImageToVideoPipeline(expand_timesteps=True): no image encoder; the first latent
    frame is the VAE-encoded image and its tokens get timestep 0 (per-token timesteps [B, N])."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanImageToVideoPipeline

    torch.manual_seed(seed)
    pipe = WanImageToVideoPipeline(tokenizer=None, text_encoder=None, vae=tiny_wan_vae(),
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0),
                                   transformer=tiny_wan_transformer(), expand_timesteps=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def wan_ti2v_inputs(steps: int = 2, seed: int = 0, **kw) -> dict:
    return dict(wan_i2v_inputs(steps=steps, seed=seed, **kw), prompt_embeds=wan_inputs(seed=seed)["prompt_embeds"],
                negative_prompt_embeds=wan_inputs(seed=seed)["negative_prompt_embeds"])
