"""Sana: linear self-attention over the image, softmax cross-attention image -> text.

    attn1 (SanaLinearAttnProcessor2_0):  relu(q) . relu(k) products normalised per query, no softmax:
                                          attncap's maps are reductions of softmax probabilities, so
                                          these layers are not captured (listed in no_softmax)
    attn2 (SanaAttnProcessor2_0):         image -> text, F.scaled_dot_product_attention with the
                                          prompt's padding as an additive -10000 bias

The latent is [B, C, H, W]; tokens are row-major over (H / p, W / p). SanaPipeline batches
[uncond, cond] in one call, with t (times config.timestep_scale, 1.0 for the released models).
"""
from __future__ import annotations

from .base import Family, Timestep, image_and_text


SANA = Family(
    name="sana",
    denoisers=("SanaTransformer2DModel",),
    observe=image_and_text(text_index=1),
    attention=(("*attn2", ("image -> text",)),),
    timestep=Timestep(2, "timestep"),
    no_softmax=(("*attn1", "Sana's self-attention is linear attention (relu(q).relu(k) normalised per query, "
                           "no softmax), which attncap's softmax maps do not describe; capture its "
                           "cross-attention instead (layers='*attn2', image->text)"),),
)
