"""HiDream-I1: joint attention over [image, T5 text, Llama text, this block's Llama layer].

HiDreamAttnProcessor concatenates [image, text] (torch.cat([query_i, query_t])), and the transformer
builds the text side of block b as [T5, Llama (llama_layers[-1], carried through the double
blocks), Llama layer llama_layers[b] (fresh for each block)]; the single blocks append that block's
layer to [image, T5, Llama] the same way. So every call is

    image | image_padding | text (T5) | text_2 (Llama) | text_2_layer (this block's Llama layer)

Non-square latents are padded to max_resolution's token count; the padded image tokens' keys are
zeroed (hidden_states_masks), not masked, so they take probability: filed as image_padding.
The default relations are the image's attention to both encodings of the prompt (text, text_2).
The pipeline batches [uncond, cond] in one call and passes t.
"""
from __future__ import annotations

from .base import Family, Timestep, arg, length


def _llama_length(llama, layer: int) -> int:
    return int(llama[layer].shape[1]) if llama is not None else 0


def _observe(model, args, kwargs):
    latent = arg(args, kwargs, 0, "hidden_states")
    c = model.config
    masks, sizes = kwargs.get("hidden_states_masks"), kwargs.get("img_sizes")
    if masks is None:                                   # [B, C, H, W], patchified by the transformer
        h, w = (int(s) // c.patch_size for s in latent.shape[-2:])
        total = h * w if latent.shape[-2] == latent.shape[-1] else model.max_seq
    else:                                               # pre-patchified [B, S, F] with per-sample sizes
        shapes = {tuple(int(v) for v in s) for s in sizes}
        h, w = shapes.pop() if len(shapes) == 1 else (0, 0)
        total = latent.shape[1]
    n_image = h * w
    if not n_image:                                     # samples of different sizes: one grid-less run
        n_image, h, w = total, None, None
    llama = arg(args, kwargs, 3, "encoder_hidden_states_llama3")
    return {"image": (n_image, (h, w) if h else None), "image_padding": (total - n_image, None),
            "text": (length(arg(args, kwargs, 2, "encoder_hidden_states_t5")), None),
            "text_2": (_llama_length(llama, c.llama_layers[-1]), None),
            "text_2_layer": (_llama_length(llama, c.llama_layers[0]), None)}


HIDREAM = Family(
    name="hidream",
    denoisers=("HiDreamImageTransformer2DModel",),
    observe=_observe,
    attention=(("*", (("image+image_padding+text+text_2+text_2_layer", "image+text+text_2+text_2_layer"),)),),
    default_relations=("image->text", "image->text_2"),   # the prompt through T5 and through Llama
    timestep=Timestep(1, "timesteps"),
)
