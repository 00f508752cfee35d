"""attncap.capture on the Qwen-Omni thinkers, Qwen3-VL-MoE, Mllama and the LLaVA video models
(tests/tiny_vlms.py), against eager.

Per model: every language-model layer's map equals eager ``output_attentions`` (all relations, every
head), logits unchanged, image / video / audio segments on the grids their processors lay out
(written here from the processors' conventions, not from attncap's rules); one image patch planted in
the pixels moves exactly its own grid cell; generate() gives the same ids and keeps the grids at
every step. Mllama's cross-attention keys are its tower's tiles: [cls, (g, g) patches] per tile.
"""
from __future__ import annotations

import re

import pytest
import torch

pytest.importorskip("transformers")

import attncap  # noqa: E402
from test_capture_transformers import llava_inputs, tiny_llava, tiny_qwen2_5_vl, tiny_qwen2_vl  # noqa: E402
from test_capture_vlm_families import _local_tower, eager  # noqa: E402
from tiny_vlms import AUDIO, IMAGE, PAD, VIDEO, gemma3n, glm4v, idefics2, llava_next_video, llava_onevision, mllama, mllama_inputs, \
    phi4mm, phi4mm_inputs, qwen2_5_omni, qwen3_omni, qwen3_vl, qwen3_vl_moe, qwen_media, set_attention_dropout, tiles_inputs, video_inputs  # noqa: E402

LM = re.compile(r"(?:language_model\.|text_model\.|^model\.)layers\.(\d+)\.(self_attn|cross_attn)$")
THW = {"qwen2_vl": tiny_qwen2_vl, "qwen2_5_vl": tiny_qwen2_5_vl, "qwen2_5_omni": qwen2_5_omni, "qwen3_omni": qwen3_omni, "qwen3_vl": qwen3_vl, "qwen3_vl_moe": qwen3_vl_moe,
       "glm4v": glm4v}


def zero_blocks(model, pattern: str) -> None:
    """_local_tower for towers under other names: zero every linear layer of the blocks matching pattern."""
    with torch.no_grad():
        for n, m in model.named_modules():
            if re.search(pattern, n) and isinstance(m, torch.nn.Linear):
                m.weight.zero_()
                m.bias.zero_()


def lm_layers(model) -> list[str]:
    return sorted((n for n, _ in model.named_modules() if LM.search(n)), key=lambda n: int(LM.search(n).group(1)))


def records_map(store, layer: str, step: int = 0) -> tuple[torch.Tensor, list]:
    """[B, H, Nq, Nk] from one call's records (NaN where none), and its key segments (start, stop, name, grid, tag)."""
    recs = store.get(layer=layer, step=step)
    nq = max(r.meta["query_segment"][1] for r in recs)
    keys = sorted({tuple(r.meta["key_segment"]) + (r.relation.split("->")[1], r.key_grid, r.meta.get("key_tag"))
                   for r in recs})
    full = torch.full(recs[0].data.shape[:2] + (nq, keys[-1][1]), float("nan"), dtype=torch.float64)
    for r in recs:
        (q0, q1), (k0, k1) = r.meta["query_segment"], r.meta["key_segment"]
        full[:, :, q0:q1, k0:k1] = r.data.double()
    return full, keys


def thw_expected(ids: torch.Tensor, video_id: int = VIDEO) -> list[tuple[str, list[int], tuple | None]]:
    """Image 8x12 patches merged 2x2 -> (4, 6); video 2 temporal patches of 4x6 -> (2, 2, 3); audio: time."""
    row = ids[0]
    out = [("image", (row == IMAGE).nonzero().flatten().tolist() if video_id != IMAGE else [], (4, 6)),
           ("video", (row == video_id).nonzero().flatten().tolist(), (2, 2, 3)),
           ("audio", (row == AUDIO).nonzero().flatten().tolist(), None)]
    return [seg for seg in out if seg[1]]


def check_lm_against_eager(model, inputs, expected, layers=None) -> None:
    """Maps equal eager per LM layer (text first, then the expected segments in order), logits unchanged."""
    ref = eager(model, inputs)
    layers = layers or lm_layers(model)
    with torch.no_grad():
        plain = model(**inputs).logits
        with attncap.capture(model, relations="all", heads="all", layers=layers) as store:
            captured = model(**inputs).logits
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(captured, ref.logits, atol=1e-4, rtol=1e-4)
    media = [p for _, ps, _ in expected for p in ps]
    text = [p for p in range(inputs["input_ids"].shape[1]) if p not in set(media)]
    order = torch.tensor(text + media)
    for layer in layers:
        full, keys = records_map(store, layer)
        assert [(k[2], k[1] - k[0], k[3]) for k in keys[1:]] == [(n, len(p), g) for n, p, g in expected], layer
        want = ref.attentions[int(LM.search(layer).group(1))].double()[:, :, order][:, :, :, order]
        # fp32 softmax of the same scores: a few ulp of probabilities <= 1
        torch.testing.assert_close(full, want, atol=2e-6, rtol=1e-5)


def planted_cell(model, inputs, planted, layer, relation, skip_tag: str | None = None) -> tuple[int, int]:
    """(segment, flat grid cell) whose text->media column moved most between inputs and planted; asserts
    every other column only rescaled (a changed key changes its own column, the rest share a factor).
    Segments tagged skip_tag (masked padding tiles, probability 0) are left out."""
    rows = []
    for inp in (inputs, planted):
        with torch.no_grad(), attncap.capture(model, relations=relation, heads="all", layers=[layer]) as st:
            model(**inp)
        recs = sorted((r for r in st.get(layer=layer) if r.meta.get("key_tag") != skip_tag or skip_tag is None),
                      key=lambda r: r.meta["key_segment"][0])
        rows.append([r.data[0, :, -1].double() for r in recs])  # the last text token, every head
    shift = [(a / b).log() for a, b in zip(rows[1], rows[0])]
    median = torch.cat(shift, -1).median(-1, keepdim=True).values
    dev = [(s - median).abs().amax(0) for s in shift]
    best = max(range(len(dev)), key=lambda i: float(dev[i].max()))
    flat = int(dev[best].argmax())
    others = torch.cat([d for i, d in enumerate(dev) if i != best] + [dev[best][torch.arange(dev[best].numel()) != flat]])
    assert float(others.max()) < 1e-4 < float(dev[best][flat])
    return best, flat


def check_generate(model, inputs, layer, want: list[tuple[str, tuple | None]]) -> None:
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=PAD)  # no early eos
    with torch.no_grad():
        plain = model.generate(**inputs, **kw)
        with attncap.capture(model, relations="all", heads="mean", layers=[layer]) as store:
            captured = model.generate(**inputs, **kw)
    assert torch.equal(plain, captured)
    for step in range(3):
        recs = sorted([r for r in store.get(layer=layer, step=step) if r.relation.startswith("text->")
                       and r.relation != "text->text"], key=lambda r: r.meta["key_segment"][0])
        assert [(r.relation.split("->")[1], r.key_grid) for r in recs] == want, step
        assert step == 0 or recs[0].data.shape[2] == 1  # decode queries: the new token


# ----------------------------------------------------------------------------------- Qwen thw families
def thw_prompts(name: str, model) -> list[tuple[dict, list]]:
    """(inputs, expected segments) per prompt: one with image, video (and audio for the Omni thinkers);
    GLM-4V takes an image prompt and a video prompt, its frames written with the image token."""
    inputs = qwen_media(model, mel_frames=40 if "omni" in name else None)
    if name == "glm4v":
        video = inputs.pop("video")
        return [(inputs, thw_expected(inputs["input_ids"])), (video, thw_expected(video["input_ids"], video_id=IMAGE))]
    return [(inputs, thw_expected(inputs["input_ids"]))]


@pytest.fixture(scope="module", params=sorted(THW))
def thw(request):
    model = THW[request.param]()
    return request.param, model, thw_prompts(request.param, model)


def test_thw_lm_maps_equal_eager_with_image_video_audio_segments(thw):
    name, model, prompts = thw
    for inputs, expected in prompts:
        check_lm_against_eager(model, inputs, expected)


def _merge_row(r: int, c: int, w: int, m: int = 2) -> int:
    """Row of patch (r, c) of an (h, w) frame in a Qwen processor's pixel rows (merge blocks of m x m)."""
    return ((r // m) * (w // m) + c // m) * m * m + (r % m) * m + c % m


def test_thw_planted_patch_moves_its_image_and_video_cell(thw):
    name, model, prompts = thw
    _local_tower(model)
    layer = lm_layers(model)[0]
    img = next(p for p, _ in prompts if "pixel_values" in p)
    vid = next(p for p, _ in prompts if "pixel_values_videos" in p)
    planted = dict(img, pixel_values=img["pixel_values"].clone())
    planted["pixel_values"][_merge_row(5, 9, 12)] += 30  # patch (5, 9) of 8x12 -> token (2, 4) of (4, 6)
    assert planted_cell(model, img, planted, layer, "text->image") == (0, 2 * 6 + 4)
    planted = dict(vid, pixel_values_videos=vid["pixel_values_videos"].clone())
    planted["pixel_values_videos"][24 + _merge_row(3, 1, 6)] += 30  # frame 1, patch (3, 1) -> (1, 1, 0) of (2, 2, 3)
    assert planted_cell(model, vid, planted, layer, "text->video") == (0, 1 * 6 + 1 * 3 + 0)


def test_thw_generate_same_ids_and_grids_kept(thw):
    name, model, prompts = thw
    model = THW[name]()  # the planted test zeroed this fixture's tower
    for inputs, expected in prompts:
        check_generate(model, inputs, lm_layers(model)[0], [(n, g) for n, _, g in expected])


# ----------------------------------------------------------------------------------- Mllama
CROSS = "model.language_model.layers.1.cross_attn"
# 4 tiles of [cls, 4x4 patches]: two real (aspect ratio 1x2), two padding tiles
TILES = [(name, n, grid, tag) for tag in ("tile 0 of 2: row 0, col 0 of 1x2", "tile 1 of 2: row 0, col 1 of 1x2",
                                          "padding tile", "padding tile")
         for name, n, grid in (("cls", 1, None), ("image", 16, (4, 4)))]


def test_mllama_cross_attention_keys_are_tiles_on_their_grids():
    model = mllama()
    inputs = mllama_inputs(model)
    ref = eager(model, inputs)
    with torch.no_grad():
        plain = model(**inputs).logits
        with attncap.capture(model, relations="all", heads="all", layers=lm_layers(model)) as store:
            captured = model(**inputs).logits
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(captured, ref.logits, atol=1e-4, rtol=1e-4)
    self_map, self_keys = records_map(store, "model.language_model.layers.0.self_attn")
    assert [k[2] for k in self_keys] == ["text"]  # <|image|> is a text token: the image never replaces it
    torch.testing.assert_close(self_map, ref.attentions[0].double(), atol=2e-6, rtol=1e-5)
    cross_map, keys = records_map(store, CROSS)
    assert [(k[2], k[1] - k[0], k[3], k[4]) for k in keys] == TILES
    torch.testing.assert_close(cross_map, ref.attentions[1].double(), atol=2e-6, rtol=1e-5)
    tower_layer = "model.vision_model.transformer.layers.0.self_attn"
    with torch.no_grad(), attncap.capture(model, relations="image->image", layers=[tower_layer]) as store:
        model(**inputs)
    tower = sorted((r for r in store.records if r.meta["query_segment"][0] == 1), key=lambda r: r.meta["key_segment"][0])
    assert [r.key_grid for r in tower] == [(4, 4)] * 4  # in the tower each tile is padded to 24 tokens
    assert {r.meta["key_segment"][0] for r in tower} == {1, 25, 49, 73}


def test_mllama_planted_patch_moves_its_tile_cell():
    model = mllama()
    inputs = mllama_inputs(model)
    _local_tower(model)
    planted = dict(inputs, pixel_values=inputs["pixel_values"].clone())
    planted["pixel_values"][0, 0, 1, :, 8:12, 12:16] += 30  # tile 1, patch (2, 3)
    assert planted_cell(model, inputs, planted, CROSS, "text->image", skip_tag="padding tile") == (1, 2 * 4 + 3)


def test_mllama_generate_same_ids_and_tiles_kept():
    model = mllama()
    inputs = mllama_inputs(model)
    check_generate(model, inputs, CROSS, [(n, g) for n, _, g, _ in TILES])


# ----------------------------------------------------------------------------------- LLaVA videos
# 3 frames of 4x4 patches: NeXT-Video average-pools by 2, OneVision interpolates to ceil(4 / 2) and
# ends the video with image_newline.
VIDEOS = {"llava_next_video": (llava_next_video, False), "llava_onevision": (llava_onevision, True)}


def video_expected(ids: torch.Tensor, newline: bool) -> list[tuple[str, list[int], tuple | None]]:
    pos = (ids[0] == VIDEO).nonzero().flatten().tolist()
    if newline:
        return [("video", pos[:-1], (3, 2, 2)), ("image_newline", pos[-1:], None)]
    return [("video", pos, (3, 2, 2))]


@pytest.mark.parametrize("name", sorted(VIDEOS))
def test_llava_video_frames_on_their_grid(name):
    build, newline = VIDEOS[name]
    model = build()
    inputs = video_inputs(model)
    expected = video_expected(inputs["input_ids"], newline)
    check_lm_against_eager(model, inputs, expected)
    check_generate(model, inputs, lm_layers(model)[0], [(n, g) for n, _, g in expected])
    with torch.no_grad(), attncap.capture(model, layers="*vision_tower*layers.0.self_attn") as store:
        model(**inputs)
    assert {(r.relation, r.key_grid, r.data.shape[0]) for r in store.records} == {("video->video", (4, 4), 3)}
    _local_tower(model)
    planted = dict(inputs, pixel_values_videos=inputs["pixel_values_videos"].clone())
    planted["pixel_values_videos"][0, 1, :, 8:12, 12:16] += 30  # frame 1, patch (2, 3) -> cell (1, 1, 1)
    assert planted_cell(model, inputs, planted, lm_layers(model)[0], "text->video") == (0, 1 * 4 + 1 * 2 + 1)


# ----------------------------------------------------------------------------------- Phi-4-multimodal
def phi4_expected(ids: torch.Tensor) -> list[tuple[str, list[int], tuple | None]]:
    """Its image embedding's order: 2x1 crops of 4x4 stitched to 8x4 with a newline after each row, the
    separator, then the global view 4x4 with a newline after each row."""
    pos = (ids[0] == IMAGE).nonzero().flatten().tolist()
    crops, glob = pos[:40], pos[41:]
    return [("image", [p for i, p in enumerate(crops) if i % 5 < 4], (8, 4)),
            ("image_newline", [p for i, p in enumerate(crops) if i % 5 == 4], None), ("image_break", [pos[40]], None),
            ("image", [p for i, p in enumerate(glob) if i % 5 < 4], (4, 4)),
            ("image_newline", [p for i, p in enumerate(glob) if i % 5 == 4], None)]


def test_phi4_multimodal_crops_and_global_view_on_their_grids():
    model = phi4mm()
    inputs = phi4mm_inputs(model)
    expected = phi4_expected(inputs["input_ids"])
    check_lm_against_eager(model, inputs, expected)
    check_generate(model, inputs, lm_layers(model)[0], [(n, g) for n, _, g in expected])
    with torch.no_grad(), attncap.capture(model, layers="*img_processor*layers.0.self_attn") as store:
        model(**inputs)
    assert {(r.relation, r.key_grid, r.data.shape[0]) for r in store.records} == {("image->image", (8, 8), 3)}
    zero_blocks(model, r"img_processor\..*layers\.\d+\.")
    planted = dict(inputs, image_pixel_values=inputs["image_pixel_values"].clone())
    planted["image_pixel_values"][0, 2, :, 20:24, 8:12] += 30  # lower crop, patch (5, 2) -> pooled (2, 1) -> (6, 1)
    assert planted_cell(model, inputs, planted, lm_layers(model)[0], "text->image") == (0, 6 * 4 + 1)


# ----------------------------------------------------------------------------------- Idefics2
@pytest.mark.filterwarnings("ignore:attncap. idefics2. its image tokens have no grid")  # asserted once below
def test_idefics2_latents_named_per_image_without_a_grid():
    """Its image tokens are perceiver latents (no position on the image): one segment per image, no
    grid, and a warning that says why; the tower keeps its patch grid. Maps still equal eager."""
    model = idefics2()
    pixels = tiles_inputs(model)  # two real images and a blank padding one
    ids = torch.tensor([[5, 6] + [IMAGE] * 8 + [7] + [IMAGE] * 8 + [8, 9]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), **pixels)
    pos = (ids[0] == IMAGE).nonzero().flatten().tolist()
    with pytest.warns(UserWarning, match="no grid: they are perceiver latents"):
        check_lm_against_eager(model, inputs, [("image", pos[:8], None), ("image", pos[8:], None)])
    with torch.no_grad(), attncap.capture(model, relations="text->image", layers=lm_layers(model)[:1]) as store:
        model(**inputs)
    assert [r.meta["key_tag"] for r in store.records] == ["tile 0 of 2", "tile 1 of 2"]
    with torch.no_grad(), attncap.capture(model, layers="*vision_model*layers.0.self_attn") as store:
        model(**inputs)
    assert {(r.relation, r.key_grid, r.data.shape[0]) for r in store.records} == {("image->image", (8, 8), 2)}


# ----------------------------------------------------------------------------------- Gemma 3n
def test_gemma3n_soft_tokens_on_their_grid():
    """Gemma 3n's image tokens are its tower's final feature map, row-major (get_image_features reshapes
    [C, h, w] to h * w tokens): (4, 4). The tower is a stand-in (tests/tiny_vlms.py): timm is not installed."""
    model = gemma3n()
    pv = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[5, 6, 55] + [IMAGE] * 16 + [56, 8, 9]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pv)
    expected = [("image", list(range(3, 19)), (4, 4))]
    check_lm_against_eager(model, inputs, expected)
    check_generate(model, inputs, lm_layers(model)[0], [("image", (4, 4))])
    planted = dict(inputs, pixel_values=pv.clone())
    planted["pixel_values"][0, :, 16:24, 8:16] += 30  # 8x8 block (2, 1) of the stand-in's patchify
    assert planted_cell(model, inputs, planted, lm_layers(model)[0], "text->image") == (0, 2 * 4 + 1)


# ----------------------------------------------------------------------------------- LLaVA, refusal
def test_llava_planted_patch_moves_its_grid_cell():
    """LLaVA (tests/test_capture_transformers.py): 24x24 pixels, patch 4, class token dropped -> (6, 6)."""
    model = tiny_llava()
    inputs = llava_inputs()
    _local_tower(model)
    planted = dict(inputs, pixel_values=inputs["pixel_values"].clone())
    planted["pixel_values"][0, :, 8:12, 12:16] += 30  # patch (2, 3) of the first prompt's image
    assert planted_cell(model, inputs, planted, lm_layers(model)[0], "text->image") == (0, 2 * 6 + 3)


BUILDERS = dict(THW, mllama=mllama, phi4mm=phi4mm, idefics2=idefics2, gemma3n=gemma3n,
                llava_next_video=llava_next_video, llava=tiny_llava)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_training_mode_attention_dropout_refused_before_the_forward(name):
    model = BUILDERS[name]()
    assert set_attention_dropout(model, 0.1) > 0
    model.train()
    with pytest.raises(ValueError, match=r"(attention_)?dropout=0\.1 and the model is in training mode"):
        with attncap.capture(model):
            raise AssertionError("the block must not run")
