"""Tiny random-weight pipelines WITH text encoders, for code that must encode a prompt (attncap.explain).

tests/tiny_pipelines.py and tests/tiny_transformers.py leave text encoders out (tests pass prompt
embeddings); these builders add CLIP / T5 / UMT5 encoders of a few thousand weights over the demo model's
word-level tokenizer (its vocabulary: a, an, and, the six colours, the three shapes), so prompts like
"a red circle and a blue square" go through each pipeline's own encode_prompt. No downloads.

    builder     pipeline (from)                          text encoders
    tiny_sd     tiny_pipelines.tiny_sd                   CLIP 16 (model_max_length 16)
    tiny_sdxl   tiny_pipelines.tiny_sdxl                 CLIP 8 + CLIP 8 with projection 12 (pooled)
    tiny_sd3    tiny_transformers.tiny_sd3(dual=True)    CLIP 8/12 + CLIP 8/12, T5 32 (32 positions)
    tiny_flux   tiny_transformers.tiny_flux              CLIP 24 (pooled), T5 32
    tiny_wan    tiny_transformers.tiny_wan(two=)         UMT5 32
"""
from __future__ import annotations

import torch

from attncap.demo_model.tokenizer import build_tokenizer


def _clip(hidden: int, projection: int | None = None, length: int = 16):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tok = build_tokenizer(max_length=length)
    cfg = CLIPTextConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=length, projection_dim=projection or hidden,
                         pad_token_id=0, eos_token_id=1, bos_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(cfg).eval(), tok


def _t5(d_model: int, umt5: bool = False):
    from transformers import T5Config, T5EncoderModel, UMT5Config, UMT5EncoderModel

    tok = build_tokenizer(max_length=32)
    kw = dict(vocab_size=len(tok), d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=1, num_heads=2,
              pad_token_id=0, decoder_start_token_id=0)
    model = UMT5EncoderModel(UMT5Config(**kw)) if umt5 else T5EncoderModel(T5Config(**kw))
    return model.eval(), tok


def _rebuild(pipe, **components):
    out = type(pipe)(**{**pipe.components, **components}, **({} if "boundary_ratio" not in pipe.config else
                                                                 {"boundary_ratio": pipe.config.boundary_ratio}))
    out.set_progress_bar_config(disable=True)
    return out


def tiny_sd():
    """SD 1.x-style: CLIP text encoder (width 16) and tokenizer."""
    from tiny_pipelines import tiny_sd as build

    torch.manual_seed(0)
    te, tok = _clip(16)
    return _rebuild(build(), text_encoder=te, tokenizer=tok)


def tiny_sdxl():
    """SDXL: two CLIPs (8 + 8 = cross-attention width 16), the second with a 12-wide projection (pooled)."""
    from tiny_pipelines import tiny_sdxl as build

    torch.manual_seed(0)
    te, tok = _clip(8)
    te2, tok2 = _clip(8, projection=12)
    return _rebuild(build(), text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2)


def tiny_sd3():
    """SD3.5-style (dual attention block): two projecting CLIPs (pooled 12 + 12) and a T5 of width 32."""
    from tiny_transformers import tiny_sd3 as build

    torch.manual_seed(0)
    te, tok = _clip(8, projection=12)
    te2, tok2 = _clip(8, projection=12)
    te3, tok3 = _t5(32)
    return _rebuild(build(dual=True), text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2,
                    text_encoder_3=te3, tokenizer_3=tok3)


def tiny_flux():
    """Flux: CLIP width 24 (pooled projections) and a T5 of width 32."""
    from tiny_transformers import tiny_flux as build

    torch.manual_seed(0)
    te, tok = _clip(24)
    te2, tok2 = _t5(32)
    return _rebuild(build(), text_encoder=te, tokenizer=tok, text_encoder_2=te2, tokenizer_2=tok2)


def tiny_wan(two: bool = False):
    """Wan 2.1 text-to-video (two=True: Wan 2.2 with transformer_2) with a UMT5 of width 32."""
    from tiny_transformers import tiny_wan as build

    torch.manual_seed(0)
    te, tok = _t5(32, umt5=True)
    return _rebuild(build(two=two), text_encoder=te, tokenizer=tok)
