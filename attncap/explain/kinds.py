"""How explain drives each pipeline family: a table of small functions, one row per family.

A Kind says how to recognise a pipeline, whether its denoiser is flow-matching trained (noised by
interpolation) or DDPM trained (noised with alphas_cumprod), the resolution it expects, how an image
becomes its clean latent x0, how the prompt is encoded (always through the pipeline's own
encode_prompt) and how one denoiser call is made, as the pipeline's own loop makes it.

    family  pipelines                          space               noising   denoiser call
    shapes  ShapesPipeline (attncap demo)      pixels in [-1, 1]   DDPM      unet(x, t, text)
    sd      SD 1.x / 2.x (UNet, no text_time)  AutoencoderKL       DDPM      unet(x, t, text)
    sdxl    SDXL (UNet with text_time)         AutoencoderKL       DDPM      + pooled text, time ids
    sd3     SD3 / SD3.5                        AutoencoderKL shift flow      transformer(x, t, text, pooled)
    flux    Flux.1 text-to-image               AutoencoderKL shift flow      packed 2x2 latents, t / 1000
    wan     Wan 2.1 / 2.2 text-to-video        AutoencoderKLWan    flow      transformer(x, t, text); 2.2:
                                                                             transformer_2 below the boundary

Shape legend: B batch (1), C latent channels, F frames, f latent frames, h, w latent sides.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

Cond = dict  # what prompt() returns and denoise() reads


@dataclass(frozen=True)
class Kind:
    name: str
    matches: Callable[[Any], bool]
    flow: bool                                        # flow matching: x_t = s * noise + (1 - s) * x0
    multiple: Callable[[Any], int]                    # height and width must be multiples of this
    default_size: Callable[[Any], tuple[int, int]]    # the pipeline's default (height, width)
    encode: Callable[[Any, torch.Tensor], torch.Tensor]  # pixels [B, 3, (F,) H, W] in [-1, 1] -> x0
    prompt: Callable[[Any, str, dict], Cond]          # (pipe, text, context) -> conditioning
    denoise: Callable[[Any, torch.nn.Module, torch.Tensor, float, Cond], Any]  # (pipe, model, x_t, t, cond)
    video: bool = False
    temporal: Callable[[Any], int] | None = None      # video: frame counts are temporal * k + 1
    max_sequence_length: int | None = None            # the pipeline's __call__ default for its T5/UMT5 prompt
    denoiser_for: Callable[[Any, float], str] = lambda pipe, t: "transformer"  # the component called at t


def _denoiser(pipe: Any, names=("unet", "transformer")) -> torch.nn.Module | None:
    return next((getattr(pipe, n) for n in names if getattr(pipe, n, None) is not None), None)


def _unet(pipe, t: float) -> str:
    return "unet"


def _class_is(component: str, *names: str) -> Callable[[Any], bool]:
    return lambda pipe: type(getattr(pipe, component, None)).__name__ in names


def _vae_kl(pipe: Any, x: torch.Tensor) -> torch.Tensor:
    """AutoencoderKL: (mode - shift_factor) * scaling_factor (SD has no shift; SDXL VAEs may carry
    latents_mean/std, which SDXL's decode undoes)."""
    vae = pipe.vae
    z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode()
    cfg = vae.config
    mean, std = cfg.get("latents_mean"), cfg.get("latents_std")
    if mean is not None and std is not None:
        shape = (1, -1) + (1,) * (z.dim() - 2)
        mean = torch.tensor(mean, device=z.device, dtype=z.dtype).view(shape)
        std = torch.tensor(std, device=z.device, dtype=z.dtype).view(shape)
        return (z - mean) * cfg.scaling_factor / std
    return (z - (cfg.get("shift_factor") or 0.0)) * cfg.scaling_factor


def _vae_wan(pipe: Any, x: torch.Tensor) -> torch.Tensor:
    """AutoencoderKLWan [B, 3, F, H, W] -> [B, z, f, h, w], normalised as WanPipeline's decode expects."""
    vae = pipe.vae
    z = vae.encode(x.to(vae.device, vae.dtype)).latent_dist.mode()
    shape = (1, vae.config.z_dim, 1, 1, 1)
    mean = torch.tensor(vae.config.latents_mean, device=z.device, dtype=z.dtype).view(shape)
    std = torch.tensor(vae.config.latents_std, device=z.device, dtype=z.dtype).view(shape)
    return (z - mean) / std


def _batch_t(t: float, x: torch.Tensor, dtype=None) -> torch.Tensor:
    return torch.full((x.shape[0],), t, device=x.device, dtype=dtype or x.dtype)


# ------------------------------------------------------------------ shapes (the embedded demo model)
def _shapes_prompt(pipe, text, ctx):
    return {"text": pipe.encode_prompt([text], ctx["device"])}


def _unet_call(pipe, model, x, t, cond):
    return model(x, _batch_t(round(t), x, torch.long), encoder_hidden_states=cond["text"],
                 added_cond_kwargs=cond.get("added"), return_dict=False)


# ------------------------------------------------------------------ SD 1.x / 2.x and SDXL
def _sd_prompt(pipe, text, ctx):
    embeds, _ = pipe.encode_prompt(text, ctx["device"], 1, False)
    return {"text": embeds}


def _sdxl_prompt(pipe, text, ctx):
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=text, device=ctx["device"], num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    te2 = getattr(pipe, "text_encoder_2", None)
    proj = te2.config.projection_dim if te2 is not None else int(pooled.shape[-1])
    hw = tuple(ctx["size"])
    time_ids = pipe._get_add_time_ids(hw, (0, 0), hw, dtype=embeds.dtype, text_encoder_projection_dim=proj)
    return {"text": embeds, "added": {"text_embeds": pooled, "time_ids": time_ids.to(embeds.device)}}


def _is_sd(pipe) -> bool:
    unet = getattr(pipe, "unet", None)
    return (type(unet).__name__ == "UNet2DConditionModel" and getattr(pipe, "vae", None) is not None
            and unet.config.addition_embed_type is None and unet.config.in_channels == pipe.vae.config.latent_channels)


def _is_sdxl(pipe) -> bool:
    unet = getattr(pipe, "unet", None)
    return (type(unet).__name__ == "UNet2DConditionModel" and getattr(pipe, "vae", None) is not None
            and unet.config.addition_embed_type == "text_time"
            and unet.config.in_channels == pipe.vae.config.latent_channels)


def _unet_size(pipe):
    s = pipe.unet.config.sample_size
    s = (s, s) if isinstance(s, int) else tuple(s)
    return (s[0] * pipe.vae_scale_factor, s[1] * pipe.vae_scale_factor)


# ------------------------------------------------------------------ SD3
def _sd3_prompt(pipe, text, ctx):
    embeds, _, pooled, _ = pipe.encode_prompt(prompt=text, prompt_2=None, prompt_3=None, device=ctx["device"],
                                              do_classifier_free_guidance=False,
                                              max_sequence_length=ctx["max_sequence_length"])
    return {"text": embeds, "pooled": pooled}


def _sd3_call(pipe, model, x, t, cond):
    return model(hidden_states=x, timestep=_batch_t(t, x), encoder_hidden_states=cond["text"],
                 pooled_projections=cond["pooled"], return_dict=False)


# ------------------------------------------------------------------ Flux
def _flux_prompt(pipe, text, ctx):
    embeds, pooled, text_ids = pipe.encode_prompt(prompt=text, prompt_2=None, device=ctx["device"],
                                                  max_sequence_length=ctx["max_sequence_length"])
    return {"text": embeds, "pooled": pooled, "text_ids": text_ids}


FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale, embedded by guidance-distilled models (dev)


def _flux_call(pipe, model, x, t, cond):
    b, c, h, w = x.shape
    packed = pipe._pack_latents(x, b, c, h, w)                           # [B, h/2 * w/2, 4C]
    img_ids = pipe._prepare_latent_image_ids(b, h // 2, w // 2, x.device, x.dtype)
    guidance = _batch_t(FLUX_GUIDANCE, x, torch.float32) if model.config.guidance_embeds else None
    return model(hidden_states=packed, timestep=_batch_t(t / 1000.0, x), guidance=guidance,
                 pooled_projections=cond["pooled"], encoder_hidden_states=cond["text"], txt_ids=cond["text_ids"],
                 img_ids=img_ids, return_dict=False)


def _is_flux(pipe) -> bool:
    tr, vae = getattr(pipe, "transformer", None), getattr(pipe, "vae", None)
    return (type(tr).__name__ == "FluxTransformer2DModel" and vae is not None
            and tr.config.in_channels == 4 * vae.config.latent_channels)  # not Fill/Control (extra channels)


# ------------------------------------------------------------------ Wan
def _wan_prompt(pipe, text, ctx):
    embeds, _ = pipe.encode_prompt(prompt=text, do_classifier_free_guidance=False,
                                   max_sequence_length=ctx["max_sequence_length"], device=ctx["device"])
    return {"text": embeds}


def _wan_call(pipe, model, x, t, cond):
    timestep = _batch_t(t, x, torch.float32)
    if pipe.config.get("expand_timesteps"):  # Wan 2.2 TI2V: one timestep per token (all t without an image)
        _, ph, pw = model.config.patch_size
        timestep = timestep[:, None].expand(-1, x.shape[2] * (x.shape[3] // ph) * (x.shape[4] // pw))
    return model(hidden_states=x, timestep=timestep, encoder_hidden_states=cond["text"], return_dict=False)


def _is_wan(pipe) -> bool:
    tr, vae = _denoiser(pipe, ("transformer", "transformer_2")), getattr(pipe, "vae", None)
    return (type(tr).__name__ == "WanTransformer3DModel" and vae is not None
            and tr.config.in_channels == vae.config.z_dim)  # text-to-video (I2V stacks condition channels)


def _wan_expert(pipe, t: float) -> str:
    """WanPipeline's choice: transformer at t >= boundary_ratio * T (and without a boundary), else transformer_2."""
    ratio = pipe.config.get("boundary_ratio")
    low = ratio is not None and t < ratio * pipe.scheduler.config.num_train_timesteps
    return "transformer_2" if low and getattr(pipe, "transformer_2", None) is not None else "transformer"


def _wan_multiple(pipe):
    tr = _denoiser(pipe, ("transformer", "transformer_2"))
    return pipe.vae_scale_factor_spatial * tr.config.patch_size[1]


KINDS: tuple[Kind, ...] = (
    Kind("shapes", lambda p: type(p).__name__ == "ShapesPipeline",
         flow=False, multiple=lambda p: 8, default_size=lambda p: (p.unet.config.sample_size,) * 2,
         encode=lambda p, x: x.to(p.unet.device, p.unet.dtype), prompt=_shapes_prompt, denoise=_unet_call,
         denoiser_for=_unet),
    Kind("sd", _is_sd, flow=False, multiple=lambda p: p.vae_scale_factor, default_size=_unet_size, encode=_vae_kl,
         prompt=_sd_prompt, denoise=_unet_call, denoiser_for=_unet),
    Kind("sdxl", _is_sdxl, flow=False, multiple=lambda p: p.vae_scale_factor, default_size=_unet_size,
         encode=_vae_kl, prompt=_sdxl_prompt, denoise=_unet_call, denoiser_for=_unet),
    Kind("sd3", _class_is("transformer", "SD3Transformer2DModel"), flow=True,
         multiple=lambda p: p.vae_scale_factor * p.transformer.config.patch_size,
         default_size=lambda p: (p.default_sample_size * p.vae_scale_factor,) * 2, encode=_vae_kl,
         prompt=_sd3_prompt, denoise=_sd3_call, max_sequence_length=256),
    Kind("flux", _is_flux, flow=True, multiple=lambda p: p.vae_scale_factor * 2,
         default_size=lambda p: (p.default_sample_size * p.vae_scale_factor,) * 2, encode=_vae_kl,
         prompt=_flux_prompt, denoise=_flux_call, max_sequence_length=512),
    Kind("wan", _is_wan, flow=True, multiple=_wan_multiple, default_size=lambda p: (480, 832), encode=_vae_wan,
         prompt=_wan_prompt, denoise=_wan_call, video=True, temporal=lambda p: p.vae_scale_factor_temporal,
         max_sequence_length=512, denoiser_for=_wan_expert),
)


def kind_of(pipe: Any) -> Kind:
    """The Kind of ``pipe``, or a ValueError naming the families explain knows."""
    for kind in KINDS:
        if kind.matches(pipe):
            return kind
    denoiser = _denoiser(pipe, ("unet", "transformer", "transformer_2"))
    raise ValueError(f"attncap.explain does not know how to drive a {type(pipe).__name__} (denoiser "
                     f"{type(denoiser).__name__}); it knows {[k.name for k in KINDS]}: the demo ShapesPipeline, "
                     "SD 1.x/2.x, SDXL, SD3, Flux.1 text-to-image and Wan text-to-video pipelines. For another model, "
                     "noise your latent yourself and call its denoiser under attncap.capture")
