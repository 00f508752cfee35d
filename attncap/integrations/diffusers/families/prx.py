"""PRX (Photoroom): image queries over [text, image] keys in every block.

PRXAttnProcessor2_0 projects keys and values from the text and the image and concatenates them text
first (torch.cat((txt_k, img_k))); the queries are the image tokens only. The prompt's padding is a
boolean key mask. The pipelines batch [uncond, cond] and pass t / num_train_timesteps (1000).
"""
from __future__ import annotations

from .base import Family, Timestep, image_and_text


PRX = Family(
    name="prx",
    denoisers=("PRXTransformer2DModel",),
    observe=image_and_text(text_index=2),
    attention=(("*", ("image -> text+image",)),),
    timestep=Timestep(1, "timestep", scale=1000.0),
)
