"""Stable Audio Open adapter: audio tokens (grid (L,)) with one global token, cross-attention to the text.

Layout from diffusers: StableAudioDiTModel prepends the global token (seconds start/end + timestep) to the
audio frames; StableAudioAttnProcessor2_0 attends [global, audio] to itself (attn1, GQA keys repeated) and
to the context [T5 prompt, seconds_start, seconds_end] (attn2) that StableAudioPipeline builds.
"""
from __future__ import annotations

import pytest
import torch

from family_harness import check_family, default_relations

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT, FRAMES = 6, 11


def tiny_stable_audio():
    from diffusers import StableAudioDiTModel

    torch.manual_seed(0)
    return StableAudioDiTModel(sample_size=4, in_channels=3, num_layers=1, attention_head_dim=4, num_attention_heads=4,
                               num_key_value_attention_heads=2, out_channels=3, cross_attention_dim=4, time_proj_dim=8,
                               global_states_input_dim=8, cross_attention_input_dim=4).eval()


def test_stable_audio_global_audio_text_duration():
    from diffusers.models.embeddings import get_1d_rotary_pos_embed

    model = tiny_stable_audio()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 3, FRAMES, generator=g), timestep=torch.tensor([0.5]),
                  encoder_hidden_states=torch.randn(1, TEXT + 2, 4, generator=g),
                  global_hidden_states=torch.randn(1, 1, 8, generator=g),
                  rotary_embedding=get_1d_rotary_pos_embed(2, FRAMES + 1, use_real=True, repeat_interleave_real=False))
    queries = {"global": (0, 1, None), "audio": (1, 1 + FRAMES, (FRAMES,))}
    keys = {"text": (0, TEXT, None), "duration": (TEXT, TEXT + 2, None)}
    check_family(model, lambda: model(**inputs), {"*attn1": [(queries, queries)], "*attn2": [(queries, keys)]}, pool=3)
    assert default_relations(model, lambda: model(**inputs)) == {("audio->text", (FRAMES,))}
