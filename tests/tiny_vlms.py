"""Tiny random-weight transformers models built from configs (no downloads, CPU, about a second each):
vision-language families with their own image-token layouts, and language models with attention
variants (sinks, softcapping, eager-only).

    builder          family              image tokens in the language model (pixel inputs of vlm_inputs)
    llava_next       LLaVA-NeXT          base tile 4x4 + 3 anyres tiles stitched, unpadded, newline per row
    llava_onevision  LLaVA-OneVision     the same with OneVision's packing (SigLIP tower, no class token)
    aya_vision       Aya Vision          one tile, 8x8 patches pixel-shuffled (2) to 4x4
    internvl         InternVL            one tile, 8x8 patches pixel-shuffled (0.5) to 4x4, class token dropped
    gemma3           Gemma 3             8x8 patches average-pooled to mm_tokens_per_image = 16 -> 4x4
    paligemma        PaliGemma           8x8 patches (SigLIP, no class token), bidirectional prefix
    idefics3         Idefics3            2 images of 8x8 patches (scale 2 -> 4x4), not split; a blank padding tile dropped
    smolvlm          SmolVLM             the same (Idefics3-style connector)
    mistral3         Mistral 3 / Pixtral 32x48 pixels, patch 4, merge 2 -> 4x6 with [IMG_BREAK] / [IMG_END]
    llama4           Llama 4             one tile, 8x8 patches, class token last in the tower, shuffle -> 4x4
    kimi_k25         Kimi-K2.5           grid_thw (1, 8, 12), merge kernel 2x2 -> 4x6
    qwen2_5_omni, qwen3_omni, qwen3_vl, qwen3_vl_moe, glm4v   (qwen_media) image 8x12 -> 4x6, video (2, 4, 6)
                                         -> (2, 2, 3), Omni audio tokens; GLM-4V: an image and a video prompt
    mllama           Mllama              cross-attention keys: 4 tiles (2 real) of [cls, 4x4]
    llava_next_video LLaVA-NeXT-Video    (video_inputs) 3 frames of 4x4 patches pooled to 2x2
    idefics2         Idefics2            8 perceiver latents per image (no grid)
    phi4mm           Phi-4-multimodal    2x1 crops stitched 8x4 + newlines, separator, global 4x4 + newlines
    gemma3n          Gemma 3n            a stand-in tower's 4x4 feature map (timm is not installed)

Every text config has 4 query heads over 2 key heads (GQA), so maps average over real GQA groups.
"""
from __future__ import annotations

import torch

IMAGE, BREAK, END, PAD = 60, 57, 58, 0
FAKE, GLOBAL_IMG = 50, 49  # Idefics3 / SmolVLM: <fake_token_around_image>, <global-img>

TEXT = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, max_position_embeddings=512, bos_token_id=1, eos_token_id=2,
            pad_token_id=PAD)
CLIP = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, image_size=16, patch_size=4, projection_dim=32)
SIGLIP = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=2, image_size=32, patch_size=4)


def _eval(model):
    return model.eval()


def llava_next(seed: int = 0):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaNextConfig(text_config=dict(TEXT, model_type="llama"), vision_config=CLIP, image_token_id=IMAGE,
                          image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]], vision_feature_layer=-1)
    return _eval(LlavaNextForConditionalGeneration(cfg))


def llava_onevision(seed: int = 0):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaOnevisionConfig(text_config=dict(TEXT, model_type="qwen2"), vision_config=dict(SIGLIP, image_size=16),
                               image_token_id=IMAGE, video_token_id=61,
                               image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]], vision_feature_layer=-1)
    return _eval(LlavaOnevisionForConditionalGeneration(cfg))


def anyres_inputs(model, size=(14, 40), seed: int = 0) -> dict:
    """One image of ``size`` pixels: 1 base + 2 tiles of 16x16 (pinpoint 16x32), patch 4; the 4x8 stitched
    grid loses 2 padding rows at the top and bottom when unpadded (14x40 is wider than 16x32)."""
    g = torch.Generator().manual_seed(seed)
    pv = torch.randn(1, 3, 3, 16, 16, generator=g)
    return dict(pixel_values=pv, image_sizes=torch.tensor([list(size)]))


def aya_vision(seed: int = 0):
    from transformers import AyaVisionConfig, AyaVisionForConditionalGeneration

    torch.manual_seed(seed)
    cfg = AyaVisionConfig(text_config=dict(TEXT, model_type="cohere2", layer_types=None, sliding_window=4096),
                          vision_config=SIGLIP, image_token_id=IMAGE, downsample_factor=2,
                          vision_feature_layer=-1, adapter_layer_norm_eps=1e-6)
    return _eval(AyaVisionForConditionalGeneration(cfg))


def internvl(seed: int = 0):
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  image_size=[32, 32], patch_size=[4, 4])
    cfg = InternVLConfig(text_config=dict(TEXT, model_type="qwen2"), vision_config=vision, image_token_id=IMAGE,
                         vision_feature_layer=-1)
    return _eval(InternVLForConditionalGeneration(cfg))


def gemma3(seed: int = 0):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(TEXT, model_type="gemma3_text", sliding_window=4, layer_types=["full_attention", "sliding_attention"],
                query_pre_attn_scalar=8)
    cfg = Gemma3Config(text_config=text, vision_config=SIGLIP, image_token_id=IMAGE, mm_tokens_per_image=16,
                       boi_token_index=55, eoi_token_index=56)
    model = Gemma3ForConditionalGeneration(cfg)
    with torch.no_grad():  # initialised to zeros: every image token would be the same
        model.model.multi_modal_projector.mm_input_projection_weight.normal_(0, 0.2)
    return _eval(model)


def paligemma(seed: int = 0):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration

    torch.manual_seed(seed)
    cfg = PaliGemmaConfig(text_config=dict(TEXT, model_type="gemma"), vision_config=dict(SIGLIP, projection_dim=32),
                          image_token_id=IMAGE, projection_dim=32)
    return _eval(PaliGemmaForConditionalGeneration(cfg))


def square_inputs(model, tiles: int = 1, side: int = 32, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(pixel_values=torch.randn(tiles, 3, side, side, generator=g))


def idefics3(seed: int = 0, smol: bool = False):
    from transformers import (Idefics3Config, Idefics3ForConditionalGeneration, SmolVLMConfig,
                              SmolVLMForConditionalGeneration)

    torch.manual_seed(seed)
    config, model = (SmolVLMConfig, SmolVLMForConditionalGeneration) if smol else \
        (Idefics3Config, Idefics3ForConditionalGeneration)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=4)
    cfg = config(text_config=dict(TEXT, model_type="llama"), vision_config=vision, image_token_id=IMAGE,
                 scale_factor=2)
    return _eval(model(cfg))


def smolvlm(seed: int = 0):
    return idefics3(seed, smol=True)


def tiles_inputs(model, seed: int = 0) -> dict:
    """[1, 3, C, 32, 32]: two real tiles and one blank padding tile (dropped by the model)."""
    g = torch.Generator().manual_seed(seed)
    pv = torch.randn(1, 3, 3, 32, 32, generator=g)
    pv[0, 2] = 0
    return dict(pixel_values=pv)


def mistral3(seed: int = 0):
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=2, image_size=64, patch_size=4, head_dim=16)
    cfg = Mistral3Config(text_config=dict(TEXT, model_type="mistral"), vision_config=vision, image_token_id=IMAGE,
                         spatial_merge_size=2, vision_feature_layer=-1)
    return _eval(Mistral3ForConditionalGeneration(cfg))


def pixtral_inputs(model, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(pixel_values=torch.randn(1, 3, 32, 48, generator=g), image_sizes=torch.tensor([[32, 48]]))


def llama4(seed: int = 0):
    from transformers import Llama4Config, Llama4ForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(TEXT, intermediate_size_mlp=64, num_local_experts=1, interleave_moe_layer_step=1, moe_layers=[],
                no_rope_layers=[1, 1], attention_chunk_size=64)
    vision = dict(hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=4, vision_output_dim=32, projector_input_dim=32, projector_output_dim=32,
                  pixel_shuffle_ratio=0.5, rope_theta=10000)
    cfg = Llama4Config(text_config=text, vision_config=vision, image_token_index=IMAGE)
    return _eval(Llama4ForConditionalGeneration(cfg))


def kimi_k25(seed: int = 0):
    from transformers import Kimi_K25Config, Kimi_K25ForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(TEXT, model_type="deepseek_v3", n_routed_experts=2, num_experts_per_tok=1, first_k_dense_replace=2,
                kv_lora_rank=8, q_lora_rank=None, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
                n_group=1, topk_group=1, num_key_value_heads=4, head_dim=4)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, patch_size=2,
                  merge_kernel_size=[2, 2], pos_emb_height=16, pos_emb_width=16)
    cfg = Kimi_K25Config(text_config=text, vision_config=vision, image_token_id=IMAGE, projection_hidden_size=32)
    return _eval(Kimi_K25ForConditionalGeneration(cfg))


def thw_inputs(model, grid=(1, 8, 12), seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    p = model.config.vision_config.patch_size
    return dict(pixel_values=torch.randn(t * h * w, 3, p, p, generator=g), image_grid_thw=torch.tensor([list(grid)]))


VLMS = {
    "llava_next": (llava_next, anyres_inputs), "llava_onevision": (llava_onevision, anyres_inputs),
    "aya_vision": (aya_vision, square_inputs), "internvl": (internvl, square_inputs),
    "gemma3": (gemma3, square_inputs), "paligemma": (paligemma, square_inputs), "idefics3": (idefics3, tiles_inputs), "smolvlm": (smolvlm, tiles_inputs),
    "mistral3": (mistral3, pixtral_inputs), "llama4": (llama4, square_inputs), "kimi_k25": (kimi_k25, thw_inputs),
}


def set_attention_dropout(model, p: float) -> int:
    """Give every attention module of the model attention dropout p the way transformers stores it (the
    module's attention_dropout, Mllama's text attention dropout); returns how many modules got it."""
    n = 0
    for m in model.modules():
        for attr in ("attention_dropout", "dropout"):
            if "Attention" in type(m).__name__ and isinstance(getattr(m, attr, None), float):
                setattr(m, attr, p)
                n += 1
    return n


def feature_rows(model, pixels: dict) -> list[int]:
    """Language-model tokens each image (feature group) of ``pixels`` fills, from the model itself."""
    with torch.no_grad():
        out = model.base_model.get_image_features(**pixels)
    pooled = out.pooler_output if out.pooler_output is not None else out.last_hidden_state  # Llama 4
    if isinstance(pooled, torch.Tensor) and pooled.dim() == 3:
        return [pooled.shape[1]] * pooled.shape[0]
    if isinstance(pooled, torch.Tensor):
        return [pooled.shape[0]]
    return [x.shape[:-1].numel() for x in pooled]


def vlm_inputs(name: str, model, seed: int = 0) -> dict:
    """input_ids [1, N]: two text tokens, the images' tokens (text between feature groups), three text
    tokens; for Mistral 3 every row of [IMG] ends with [IMG_BREAK] and the last with [IMG_END]; Idefics3 /
    SmolVLM write each tile as their processors write an image that is not split (fake, global-img, tokens, fake)."""
    pixels = VLMS[name][1](model, seed=seed)
    rows = feature_rows(model, pixels)
    if name in ("idefics3", "smolvlm"):  # one feature group holds every real tile
        real = int((pixels["pixel_values"] != 0).flatten(2).any(2).sum())
        rows = [sum(rows) // real] * real
    ids = [5, 6]
    for i, n in enumerate(rows):
        if name == "mistral3":
            h, w = (int(s) // 8 for s in pixels["image_sizes"][i])
            for r in range(h):
                ids += [IMAGE] * w + [END if r == h - 1 else BREAK]
        elif name in ("idefics3", "smolvlm"):
            ids += [FAKE, GLOBAL_IMG] + [IMAGE] * n + [FAKE, 7]
        else:
            ids += [IMAGE] * n + [7]
    ids += [8, 9, 10]
    ids = torch.tensor([ids])
    out = dict(input_ids=ids, attention_mask=torch.ones_like(ids), **pixels)
    if name == "paligemma":  # the processor's prefix marks (all prompt): without them eager and sdpa disagree
        out["token_type_ids"] = torch.zeros_like(ids)
    return out


# ----------------------------------------------------------------------------------- Qwen thw families
# Qwen-style ids: vision start/end, audio start/end, video and audio placeholders (image: IMAGE).
VIDEO, AUDIO, VSTART, VEND, ASTART, AEND = 61, 62, 53, 54, 51, 52
MROPE = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}
QWEN_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2, spatial_merge_size=2,
                   temporal_patch_size=2, in_channels=3, out_hidden_size=32)
QWEN3_VISION = dict(QWEN_VISION, num_position_embeddings=64, deepstack_visual_indexes=[0])
MOE = dict(moe_intermediate_size=16, num_experts=2, num_experts_per_tok=1, decoder_sparse_step=1)
QWEN_IDS = dict(image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART, vision_end_token_id=VEND)


def qwen2_5_omni(seed: int = 0):
    """Qwen2.5-Omni thinker: Qwen2.5-VL tower (window blocks 0, full block 1), a Whisper-style audio tower."""
    from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

    torch.manual_seed(seed)
    audio = dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=32,
                 output_dim=32, n_window=4, max_source_positions=64)
    cfg = Qwen2_5OmniThinkerConfig(
        text_config=dict(TEXT, rope_parameters=MROPE), audio_config=audio,
        vision_config=dict(QWEN_VISION, window_size=8, fullatt_block_indexes=[1]),
        image_token_index=IMAGE, video_token_index=VIDEO, audio_token_index=AUDIO, vision_start_token_id=VSTART,
        vision_end_token_id=VEND, audio_start_token_id=ASTART, audio_end_token_id=AEND)
    return _eval(Qwen2_5OmniThinkerForConditionalGeneration(cfg))


def qwen3_omni(seed: int = 0):
    """Qwen3-Omni-MoE thinker: Qwen3-VL tower (deepstack at block 0), MoE text, conv-downsampled audio."""
    from transformers import Qwen3OmniMoeThinkerConfig, Qwen3OmniMoeThinkerForConditionalGeneration

    torch.manual_seed(seed)
    audio = dict(num_mel_bins=16, encoder_layers=1, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=32,
                 output_dim=32, n_window=50, max_source_positions=64, downsample_hidden_size=8)  # its lengths assume 50
    cfg = Qwen3OmniMoeThinkerConfig(text_config=dict(TEXT, **MOE, rope_parameters=MROPE), audio_config=audio,
                                    vision_config=QWEN3_VISION, audio_token_id=AUDIO, audio_start_token_id=ASTART,
                                    **QWEN_IDS)
    return _eval(Qwen3OmniMoeThinkerForConditionalGeneration(cfg))


def qwen3_vl_moe(seed: int = 0):
    from transformers import Qwen3VLMoeConfig, Qwen3VLMoeForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen3VLMoeConfig(text_config=dict(TEXT, **MOE, rope_parameters=dict(MROPE, mrope_interleaved=True)),
                           vision_config=QWEN3_VISION, **QWEN_IDS)
    return _eval(Qwen3VLMoeForConditionalGeneration(cfg))


def qwen3_vl(seed: int = 0):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    cfg = Qwen3VLConfig(text_config=dict(TEXT, rope_parameters=dict(MROPE, mrope_interleaved=True)),
                        vision_config=QWEN3_VISION, **QWEN_IDS)
    return _eval(Qwen3VLForConditionalGeneration(cfg))


def glm4v(seed: int = 0):
    """GLM-4V: its tower interpolates learned positions from image_size / patch_size = 8x8 to each grid."""
    from transformers import Glm4vConfig, Glm4vForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2, spatial_merge_size=2,
                  temporal_patch_size=2, in_channels=3, out_hidden_size=32, image_size=16)
    cfg = Glm4vConfig(text_config=dict(TEXT, rope_parameters=dict(MROPE, partial_rotary_factor=0.5, mrope_section=[1, 1, 0])), vision_config=vision,
                      image_token_id=IMAGE, video_token_id=VIDEO, image_start_token_id=VSTART,
                      image_end_token_id=VEND, video_start_token_id=ASTART, video_end_token_id=AEND)
    return _eval(Glm4vForConditionalGeneration(cfg))


def qwen_media(model, image=(1, 8, 12), video=(2, 4, 6), mel_frames: int | None = 40, seed: int = 0) -> dict:
    if model.config.model_type == "glm4v":  # its forward takes images or videos, not both (transformers 5.24)
        return glm4v_media(model, image, video, seed)
    """input_ids [1, N]: text, <vs> image <ve>, text, <vs> video <ve>, then <as> audio <ae> if
    mel_frames, then text, with the pixel / mel inputs of a Qwen processor (patches flattened to
    [t * h * w, C * tp * p * p]). Qwen3-VL's processor puts a timestamp (text) before each frame."""
    g = torch.Generator().manual_seed(seed)
    vc = model.config.vision_config
    width = 3 * vc.temporal_patch_size * vc.patch_size ** 2
    n_img, per_frame = image[0] * image[1] * image[2] // 4, video[1] * video[2] // 4
    frames = video[0] if model.config.model_type.startswith(("qwen3_vl", "glm4v")) else 1
    ids = [5, 6, VSTART] + [IMAGE] * n_img + [VEND]
    for _ in range(frames):
        ids += [7, VSTART] + [VIDEO] * (per_frame * video[0] // frames) + [VEND]
    out = dict(pixel_values=torch.randn(n_img * 4, width, generator=g), image_grid_thw=torch.tensor([list(image)]),
               pixel_values_videos=torch.randn(per_frame * video[0] * 4, width, generator=g),
               video_grid_thw=torch.tensor([list(video)]))
    if mel_frames:
        feats = torch.randn(1, model.config.audio_config.num_mel_bins, mel_frames, generator=g)
        mask = torch.ones(1, mel_frames, dtype=torch.long)
        with torch.no_grad():
            n_audio = model.get_audio_features(feats, mask).last_hidden_state.shape[0]
        ids += [ASTART] + [AUDIO] * n_audio + [AEND]
        out.update(input_features=feats, feature_attention_mask=mask, video_second_per_grid=torch.tensor([1.0]))
    ids = torch.tensor([ids + [8, 9, 10]])
    if "omni" not in model.config.model_type:  # the processors' M-RoPE groups: image 1, video 2
        out["mm_token_type_ids"] = (ids == IMAGE).int() + 2 * (ids == VIDEO).int()
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), **out)


# ----------------------------------------------------------------------------------- Mllama
def mllama(seed: int = 0, overrides: dict | None = None):
    """Mllama: self-attention layer 0, cross-attention layer 1 over the tower's tiles (16x16 pixels, patch 4:
    [cls, 4x4 patches] per tile, padded to 24 tokens inside the tower); ``overrides`` change its vision config."""
    from transformers import MllamaConfig, MllamaForConditionalGeneration

    torch.manual_seed(seed)
    text = dict(TEXT, cross_attention_layers=[1])
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1, attention_heads=2,
                  image_size=16, patch_size=4, max_num_tiles=4, vision_output_dim=64, intermediate_layers_indices=[0],
                  supported_aspect_ratios=[[1, 1], [1, 2], [2, 1], [2, 2]])
    vision.update(overrides or {})
    return _eval(MllamaForConditionalGeneration(MllamaConfig(text_config=text, vision_config=vision,
                                                             image_token_index=IMAGE)))


def mllama_inputs(model, seed: int = 0) -> dict:
    """One image of 1x2 tiles (aspect ratio id 2) padded to 4 tiles; the text after <|image|> sees its tiles."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[5, IMAGE, 6, 7, 8, 9]])
    tiles = torch.tensor([[[1, 1, 0, 0]]])
    pv = torch.randn(1, 1, 4, 3, 16, 16, generator=g) * tiles[..., None, None, None]
    cross = torch.zeros(1, 6, 1, 4, dtype=torch.long)
    cross[:, 1:, :, :2] = 1
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv, aspect_ratio_mask=tiles,
                aspect_ratio_ids=torch.tensor([[2]]), cross_attention_mask=cross)


# ----------------------------------------------------------------------------------- LLaVA videos
def llava_next_video(seed: int = 0):
    """LLaVA-NeXT-Video: CLIP tower (16x16 pixels, patch 4: 4x4 patches), frames average-pooled by 2 -> 2x2."""
    from transformers import LlavaNextVideoConfig, LlavaNextVideoForConditionalGeneration

    torch.manual_seed(seed)
    cfg = LlavaNextVideoConfig(text_config=dict(TEXT, model_type="llama"), vision_config=CLIP, image_token_id=IMAGE,
                               video_token_id=VIDEO, image_grid_pinpoints=[[16, 32], [32, 16], [32, 32]],
                               vision_feature_layer=-1, spatial_pool_stride=2)
    return _eval(LlavaNextVideoForConditionalGeneration(cfg))


def video_inputs(model, frames: int = 3, side: int = 16, seed: int = 0) -> dict:
    """One video of ``frames`` frames of side x side pixels: its tokens (from the model itself) between text."""
    g = torch.Generator().manual_seed(seed)
    pv = torch.randn(1, frames, 3, side, side, generator=g)
    with torch.no_grad():
        n = model.base_model.get_video_features(pixel_values_videos=pv).pooler_output.shape[1]
    ids = torch.tensor([[5, 6] + [VIDEO] * n + [8, 9, 10]])
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values_videos=pv)


def idefics2(seed: int = 0):
    """Idefics2: SigLIP-style tower (32x32 pixels, patch 4), perceiver resampler to 8 latents per image."""
    from transformers import Idefics2Config, Idefics2ForConditionalGeneration

    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=4)
    perceiver = dict(hidden_size=32, resampler_n_latents=8, resampler_depth=1, resampler_n_heads=2,
                     resampler_head_dim=8, num_key_value_heads=1)
    cfg = Idefics2Config(text_config=dict(TEXT, model_type="mistral"), vision_config=vision,
                         perceiver_config=perceiver, image_token_id=IMAGE)
    return _eval(Idefics2ForConditionalGeneration(cfg))


def phi4mm(seed: int = 0):
    """Phi-4-multimodal: SigLIP-style tower on 32x32 crops (patch 4: 8x8, pooled 2x2 -> 4x4), a tiny audio
    encoder (unused here); image_token_id lives in vision_config."""
    from transformers import Phi4MultimodalConfig, Phi4MultimodalForCausalLM

    torch.manual_seed(seed)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=4, crop_size=32, image_token_id=IMAGE, feature_layer=-1)
    audio = dict(hidden_size=32, intermediate_size=32, num_blocks=1, num_attention_heads=2, ext_pw_out_channel=32,
                 depthwise_separable_out_channel=32, nemo_conv_channels=32, input_size=16, audio_token_id=62)
    text = {k: v for k, v in TEXT.items() if k != "head_dim"}
    cfg = Phi4MultimodalConfig(**text, vision_config=vision, audio_config=audio, original_max_position_embeddings=512)
    return _eval(Phi4MultimodalForCausalLM(cfg))


def phi4mm_inputs(model, seed: int = 0) -> dict:
    """One 64x32 image (2x1 crops of 32x32 and the global view): crops stitched 8x4 + a newline per row,
    a separator, the global 4x4 + a newline per row = 8 * 5 + 1 + 4 * 5 = 61 image tokens."""
    g = torch.Generator().manual_seed(seed)
    pv = torch.randn(1, 3, 3, 32, 32, generator=g)
    ids = torch.tensor([[5, 6] + [IMAGE] * 61 + [8, 9, 10]])
    mask = torch.ones(1, 3, 8, 8, dtype=torch.long)
    # One patch of the global view masked: with no masked patch transformers drops the tower's mask and its
    # SDPA path turns causal (the module says is_causal=True) while eager stays bidirectional.
    mask[0, 0, -1, -1] = 0
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), image_pixel_values=pv,
                image_sizes=torch.tensor([[64, 32]]), image_attention_mask=mask)


class _StandInGemma3nTower(torch.nn.Module):
    """Gemma 3n's tower is timm's MobileNetV5 (timm needs torchvision, which this project does not install):
    a stand-in with its output contract, one [C, 4, 4] feature map per 32x32 image (an 8x8 patchify conv)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.conv = torch.nn.Conv2d(3, config.hidden_size, 8, 8)

    def forward(self, pixel_values, do_pooling=False, return_dict=True, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        return BaseModelOutputWithPooling(last_hidden_state=self.conv(pixel_values))


def gemma3n(seed: int = 0):
    """Gemma 3n with the stand-in tower (vision_soft_tokens_per_image = 16 -> 4x4); AltUp, LAuReL and
    per-layer inputs on; layer 1 is global and shares layer 0's keys and values (KV sharing)."""
    from transformers import AutoModel, Gemma3nConfig, Gemma3nForConditionalGeneration
    from transformers.models.gemma3n import modeling_gemma3n

    class Auto:
        @staticmethod
        def from_config(cfg, **kw):
            return _StandInGemma3nTower(cfg) if cfg.model_type == "gemma3n_vision" else AutoModel.from_config(cfg, **kw)

    torch.manual_seed(seed)
    text = dict(TEXT, vocab_size_per_layer_input=64, hidden_size_per_layer_input=8, num_kv_shared_layers=1,
                laurel_rank=4, altup_num_inputs=2, sliding_window=8, layer_types=["full_attention"] * 2,
                activation_sparsity_pattern=[0.0, 0.0])
    audio = dict(hidden_size=32, vocab_offset=72, vocab_size=8, conf_num_hidden_layers=1, conf_num_attention_heads=2,
                 input_feat_size=16, sscp_conv_channel_size=[8, 8])
    cfg = Gemma3nConfig(text_config=text, vision_config=dict(hidden_size=32, vocab_offset=64, vocab_size=8),
                        audio_config=audio, vision_soft_tokens_per_image=16, image_token_id=IMAGE, audio_token_id=62,
                        boi_token_id=55, eoi_token_id=56, boa_token_id=57, eoa_token_id=58)
    real, modeling_gemma3n.AutoModel = modeling_gemma3n.AutoModel, Auto
    try:
        return _eval(Gemma3nForConditionalGeneration(cfg))
    finally:
        modeling_gemma3n.AutoModel = real


def glm4v_media(model, image=(1, 8, 12), video=(2, 4, 6), seed: int = 0) -> dict:
    """GLM-4V's processor: an image as <boi> image tokens <eoi>; a video as, per frame, <boi> image tokens
    <eoi> and a timestamp (its frames use the image token). Two prompts: the image one, then the video one
    (returned as the "video" entry)."""
    g = torch.Generator().manual_seed(seed)
    width = 3 * 2 * 2 ** 2
    n_img, per_frame = image[0] * image[1] * image[2] // 4, video[1] * video[2] // 4
    img = torch.tensor([[5, 6, VSTART] + [IMAGE] * n_img + [VEND, 8, 9, 10]])
    vid = [5, ASTART]
    for f in range(video[0]):
        vid += [VSTART] + [IMAGE] * per_frame + [VEND, 20 + f]
    vid = torch.tensor([vid + [AEND, 8, 9, 10]])
    image_inputs = dict(input_ids=img, attention_mask=torch.ones_like(img), mm_token_type_ids=(img == IMAGE).int(),
                        pixel_values=torch.randn(n_img * 4, width, generator=g),
                        image_grid_thw=torch.tensor([list(image)]))
    video_inputs = dict(input_ids=vid, attention_mask=torch.ones_like(vid), mm_token_type_ids=2 * (vid == IMAGE).int(),
                        pixel_values_videos=torch.randn(per_frame * video[0] * 4, width, generator=g),
                        video_grid_thw=torch.tensor([list(video)]))
    return dict(image_inputs, video=video_inputs)
