"""Stable Audio Open: audio self-attention (attn1) and audio -> text cross-attention (attn2).

StableAudioDiTModel prepends one global token (the projected seconds start/end plus the timestep
embedding) to the audio latent's frames ([B, C, L] -> L tokens, grid (L,)), so both calls have
[global, audio] queries. StableAudioPipeline's context is [T5 prompt, seconds_start, seconds_end]
(torch.cat in __call__): the last two tokens are filed as duration.

    attn1:  global+audio -> global+audio
    attn2:  global+audio -> text+duration

The pipeline batches [uncond, cond] in one call and passes t.
"""
from __future__ import annotations

from .base import Family, Timestep, arg, length

_DURATION = 2   # seconds_start, seconds_end


def _observe(model, args, kwargs):
    latent = arg(args, kwargs, 0, "hidden_states")
    context = length(arg(args, kwargs, 2, "encoder_hidden_states"))
    n_audio = int(latent.shape[-1])
    return {"global": (length(arg(args, kwargs, 3, "global_hidden_states")), None), "audio": (n_audio, (n_audio,)),
            "text": (max(context - _DURATION, 0), None), "duration": (min(context, _DURATION), None)}


STABLE_AUDIO = Family(
    name="stable_audio",
    denoisers=("StableAudioDiTModel",),
    observe=_observe,
    attention=(("*attn1", ("global+audio",)), ("*attn2", ("global+audio -> text+duration",))),
    default_relations=("audio->text",),
    timestep=Timestep(1, "timestep"),
)
