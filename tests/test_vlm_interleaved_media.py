"""Media paths the family tests do not reach: LLaVA-NeXT-Video's images (LLaVA-NeXT's anyres rule) and
the Qwen-Omni thinkers' use_audio_in_video, where a video's frames are interleaved with its audio in the prompt
(<vision_start><audio_start> frame 0, audio, frame 1, [audio] <audio_end><vision_end>, as each thinker's
processor orders them by time). Per path: maps equal eager per language-model layer, logits
unchanged, segments on the grids the processors lay out, a planted patch at its cell, generate()
keeps the grids at every step.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from test_capture_vlm_families import PLANTS, _local_tower, expected_layout  # noqa: E402
from test_vlm_more_families import _merge_row, check_generate, check_lm_against_eager, lm_layers, \
    planted_cell  # noqa: E402
from tiny_vlms import AEND, ASTART, AUDIO, IMAGE, VEND, VIDEO, VSTART, anyres_inputs, feature_rows, llava_next_video, \
    qwen2_5_omni, qwen3_omni  # noqa: E402


def test_llava_next_video_images_use_the_anyres_rule():
    model = llava_next_video()
    pixels = anyres_inputs(model)  # base tile + 2 anyres tiles of a 14x40 image
    (n,) = feature_rows(model, pixels)
    ids = torch.tensor([[5, 6] + [IMAGE] * n + [7, 8, 9]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), **pixels)
    expected = expected_layout("llava_next", ids)  # base (4, 4), stitched (1, 8) ... from LLaVA-NeXT's processor
    check_lm_against_eager(model, inputs, expected)
    check_generate(model, inputs, lm_layers(model)[0], [(name, grid) for name, _, grid in expected])
    _local_tower(model)
    where, r, c, seg, (cr, cc) = PLANTS["llava_next"]  # right-hand tile, patch (2, 1) -> stitched (1, 5)
    planted = dict(inputs, pixel_values=pixels["pixel_values"].clone())
    planted["pixel_values"][where][..., r * 4:(r + 1) * 4, c * 4:(c + 1) * 4] += 30
    grid = expected[seg][2]
    assert planted_cell(model, inputs, planted, lm_layers(model)[0], "text->image") == (seg, cr * grid[1] + cc)


# (builder, video_second_per_grid, audio tokens the processor puts between frame 0 and frame 1).
# Qwen2.5-Omni writes chunks of seconds_per_chunk * position_id_per_seconds = 50 positions, video then
# audio: frame 1 at 2 s * 25 = 50 opens chunk 1, so all 10 audio tokens (positions 0-9) sit in chunk 0.
# Qwen3-Omni merges token by token by position: frame 1 at 0.1 s * 25 = 2.5 comes after audio 0-2.
OMNI = {"qwen2_5_omni": (qwen2_5_omni, 2.0, 10), "qwen3_omni": (qwen3_omni, 0.1, 3)}


def audio_in_video(name: str, model, seed: int = 0) -> tuple[dict, list]:
    """<vs><as> frame 0 (2x3 merged tokens), audio, frame 1, [the rest of the audio] <ae><ve>: a video of
    2 frames of 4x6 patches with its audio, laid out as the family's processor does."""
    _, seconds, between = OMNI[name]
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(1, model.config.audio_config.num_mel_bins, 40, generator=g)
    fmask = torch.ones(1, 40, dtype=torch.long)
    with torch.no_grad():
        n_audio = model.get_audio_features(feats, fmask).last_hidden_state.shape[0]
    assert model.config.position_id_per_seconds == 25 and n_audio == {"qwen2_5_omni": 10, "qwen3_omni": 5}[name]
    ids = [5, 6, VSTART, ASTART] + [VIDEO] * 6 + [AUDIO] * between + [VIDEO] * 6 + [AUDIO] * (n_audio - between)
    ids = torch.tensor([ids + [AEND, VEND, 8, 9]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), input_features=feats,
                  feature_attention_mask=fmask, pixel_values_videos=torch.randn(48, 24, generator=g),
                  video_grid_thw=torch.tensor([[2, 4, 6]]), video_second_per_grid=torch.tensor([seconds]),
                  use_audio_in_video=True)
    audio = (ids[0] == AUDIO).nonzero().flatten().tolist()
    expected = [("video", (ids[0] == VIDEO).nonzero().flatten().tolist(), (2, 2, 3)), ("audio", audio[:between], None)]
    if between < n_audio:  # each run of audio tokens is an "audio" segment
        expected.append(("audio", audio[between:], None))
    return inputs, expected


@pytest.mark.parametrize("name", sorted(OMNI))
def test_qwen_omni_audio_in_video_frames_keep_their_grid(name):
    """The video is one (2, 2, 3) segment across the audio between its frames; the audio its own segments."""
    model = OMNI[name][0]()
    inputs, expected = audio_in_video(name, model)
    check_lm_against_eager(model, inputs, expected)
    check_generate(model, inputs, lm_layers(model)[0], [(n, grid) for n, _, grid in expected])
    _local_tower(model)
    planted = dict(inputs, pixel_values_videos=inputs["pixel_values_videos"].clone())
    planted["pixel_values_videos"][24 + _merge_row(3, 1, 6)] += 30  # frame 1 (after the audio), patch (3, 1)
    assert planted_cell(model, inputs, planted, lm_layers(model)[0], "text->video") == (0, 1 * 6 + 1 * 3 + 0)
