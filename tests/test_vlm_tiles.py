"""Tile arrangements of tiled VLMs, read from the model's inputs and checked against transformers' own
processors (their code run here on local images, with a word-level tokenizer built in the test: no Hub).

- Idefics3: Idefics3Processor splits a 64x96 image into 2x3 tiles + a global view and a 96x32 one into
  3x1 + a global view; each tile's segment is tagged with its row and column, maps equal eager, and a
  patch planted in the image at tile (1, 2) moves that tile's grid cell.
- Llama 4: Llama4Processor's prompt for a 2x3 image; the arrangement is read from its separators.
- Mllama: MllamaImageProcessorPil puts a 32x48 image on 2x3 tiles (aspect_ratio_ids); cross-attention
  keys are tagged with their tile's row and column, maps equal eager, a planted patch moves its tile's cell.
- Prompts whose structure does not say the arrangement: no row/column, and a warning.
- Qwen2-VL / Qwen2.5-VL towers encoding two images in one call: frame and window records name their image.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

import attncap  # noqa: E402
from attncap.integrations.vlm_media import media_items  # noqa: E402
from test_capture_vlm_families import _local_tower, eager, text_to_image_records  # noqa: E402
from test_vlm_more_families import lm_layers, planted_cell, records_map  # noqa: E402
from tiny_vlms import IMAGE, idefics3, mllama  # noqa: E402

NEWLINE, FAKE, GLOBAL = 4, 50, 49
SPECIALS = {"<fake_token_around_image>": FAKE, "<global-img>": GLOBAL, "<image>": IMAGE,
            **{f"<row_{r}_col_{c}>": 11 + 6 * (r - 1) + c for r in range(1, 7) for c in range(1, 7)}}


def idefics3_processor():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import Idefics3Processor, PreTrainedTokenizerFast
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    vocab = {"<pad>": 0, "<unk>": 3, "\n": NEWLINE, "hi": 5, "there": 6, "and": 7, **SPECIALS}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="\n", behavior="isolated")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                   additional_special_tokens=list(SPECIALS))
    images = Idefics3ImageProcessorPil(size={"longest_edge": 96}, max_image_size={"longest_edge": 32})
    return Idefics3Processor(images, fast, image_seq_len=16)  # (32 / 4 / 2)^2 tokens per tile


def idefics3_prompt(plant: bool = False):
    """"hi" <64x96 image> "there" <96x32 image> "and": the processor's inputs and its rows / cols."""
    rng = np.random.default_rng(0)
    pics = [rng.integers(0, 200, (64, 96, 3), dtype=np.uint8), rng.integers(0, 200, (96, 32, 3), dtype=np.uint8)]
    if plant:  # tile (1, 2) of the first image, its patch (0, 0): pixels 32:36, 64:68
        pics[0][32:36, 64:68] = 255
    proc = idefics3_processor()
    images = [[PIL.fromarray(p) for p in pics]]
    info = proc.image_processor(images, return_row_col_info=True)
    out = proc(text=["hi<image>there<image>and"], images=images, return_tensors="pt")
    return dict(input_ids=out["input_ids"], attention_mask=out["attention_mask"], pixel_values=out["pixel_values"],
                pixel_attention_mask=out["pixel_attention_mask"]), list(zip(info["rows"][0], info["cols"][0]))


def expected_tags(arrangements):
    tags = []
    for i, (rows, cols) in enumerate(arrangements):
        tags += [f"image {i} of 2, tile {j} of {rows * cols}: row {j // cols}, col {j % cols} of {rows}x{cols}"
                 for j in range(rows * cols)] + [f"image {i} of 2, global view"]
    return tags


@pytest.mark.parametrize("smol", [False, True], ids=["idefics3", "smolvlm"])
def test_idefics3_tiles_tagged_as_the_processor_lays_them_out_maps_equal_eager(smol):
    model = idefics3(smol=smol)  # SmolVLM's processor writes the same structure
    inputs, arrangements = idefics3_prompt()
    assert arrangements == [(2, 3), (3, 1)]
    ref = eager(model, inputs)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        with attncap.capture(model, relations="all", heads="all", layers=lm_layers(model)) as store:
            logits = model(**inputs).logits
    torch.testing.assert_close(logits, ref.logits, atol=1e-4, rtol=1e-4)
    ids = inputs["input_ids"][0]
    media = (ids == IMAGE).nonzero().flatten().tolist()
    order = torch.tensor([p for p in range(ids.numel()) if p not in set(media)] + media)
    for i, layer in enumerate(lm_layers(model)):
        full, keys = records_map(store, layer)
        assert [(k[2], k[3], k[4]) for k in keys[1:]] == [("image", (4, 4), t) for t in expected_tags(arrangements)]
        torch.testing.assert_close(full, ref.attentions[i].double()[:, :, order][:, :, :, order], atol=1e-5, rtol=1e-5)


def test_idefics3_patch_planted_in_a_tile_moves_that_tiles_cell():
    """The planted square also shows in the first image's global view; every other tile stays put."""
    model = idefics3()
    _local_tower(model)
    (inputs, _), (planted, _) = idefics3_prompt(), idefics3_prompt(plant=True)
    captured = text_to_image_records(model, lm_layers(model)[0], (inputs, planted))
    rows = [{r.meta["key_tag"]: r.data[0, :, -1].double() for r in recs} for recs in captured]
    shift = {t: (rows[1][t] / rows[0][t]).log() for t in rows[0]}
    median = torch.cat(list(shift.values()), -1).median(-1, keepdim=True).values
    dev = {t: (s - median).abs().amax(0) for t, s in shift.items() if "global" not in t}
    moved = {t: int(d.argmax()) for t, d in dev.items() if float(d.max()) > 1e-4}
    assert moved == {"image 0 of 2, tile 5 of 6: row 1, col 2 of 2x3": 0}


def test_idefics3_structure_that_does_not_say_gives_no_layout_and_a_warning():
    """The first row-ending newline replaced by the fake token (the first row would end an image, with
    its last tile as a global view of another tag): the tiles keep their grids, numbered only, and a
    warning says why."""
    model = idefics3()
    inputs, _ = idefics3_prompt()
    ids = inputs["input_ids"].clone()
    ids[0, (ids[0] == NEWLINE).nonzero()[0]] = FAKE
    layer = lm_layers(model)[0]
    with pytest.warns(UserWarning, match=r"idefics3: the tile arrangement .* is not recorded: prompt 0: the images' "
                                         r"global views do not share one tag"):
        with torch.no_grad(), attncap.capture(model, relations="text->image", layers=[layer]) as store:
            model(**dict(inputs, input_ids=ids))
    recs = sorted(store.records, key=lambda r: r.meta["key_segment"][0])
    assert [(r.key_grid, r.meta["key_tag"]) for r in recs] == [((4, 4), f"tile {j} of 11") for j in range(11)]


def llama4_items(prompt: str, tiles: int, cfg):
    """media_items for Llama 4 on one prompt string tokenized word by word (special tokens by name)."""
    names = {"<|image_start|>": cfg.boi_token_index, "<|image_end|>": cfg.eoi_token_index, "<|patch|>": IMAGE,
             "<|image|>": 40, "<|tile_x_separator|>": 41, "<|tile_y_separator|>": 42}
    ids, rest = [5], prompt
    while rest:
        name = next(n for n in names if rest.startswith(n))
        ids.append(names[name])
        rest = rest[len(name):]
    inputs = dict(pixel_values=torch.zeros(tiles, 3, 32, 32))
    return media_items(None, cfg, inputs, "image", torch.tensor([ids + [6]]))


def test_llama4_arrangement_from_its_processors_separators():
    """Llama 4's forward fails in transformers 5.24 (its output class), so its rule is checked on the
    prompt Llama4Processor writes for a 2x3 image (global view last) and for one not split."""
    from transformers import Llama4Config
    from transformers.models.llama4.processing_llama4 import Llama4Processor

    vision = dict(image_size=32, patch_size=4, pixel_shuffle_ratio=0.5)
    cfg = Llama4Config(vision_config=vision, image_token_index=IMAGE, boi_token_index=30, eoi_token_index=31)
    split = Llama4Processor._prompt_split_image(None, (2, 3), 16)
    items = llama4_items(split, 7, cfg)
    assert [(it.pieces[0].grid, it.pieces[0].tag, it.pieces[0].no_layout) for it in items] == \
        [((4, 4), f"tile {j} of 6: row {j // 3}, col {j % 3} of 2x3", None) for j in range(6)] + \
        [((4, 4), "global view", None)]
    two = llama4_items(split + Llama4Processor._prompt_split_image(None, (1, 1), 16), 8, cfg)
    assert [it.pieces[0].tag for it in two][-2:] == ["image 0 of 2, global view", "image 1 of 2"]
    # the first x separator made a y one: rows of unequal length (the processor never writes that)
    broken = llama4_items(split.replace("<|tile_x_separator|>", "<|tile_y_separator|>", 1), 7, cfg)
    assert {it.pieces[0].tag for it in broken} == {f"tile {j} of 7" for j in range(7)}
    assert "not rows separated" in broken[0].pieces[0].no_layout


def mllama_2x3():
    """Mllama with 6 tiles of 16x16 pixels and the processor's aspect ratios for 6 tiles; inputs from
    MllamaImageProcessorPil on a 32x48 image (planted: a bright square at tile (1, 2), patch (1, 1))."""
    from transformers.models.mllama.image_processing_pil_mllama import (MllamaImageProcessorPil,
                                                                          get_all_supported_aspect_ratios)

    model = mllama(overrides=dict(max_num_tiles=6, supported_aspect_ratios=[list(r) for r in get_all_supported_aspect_ratios(6)]))
    proc = MllamaImageProcessorPil(size={"height": 16, "width": 16}, max_image_tiles=6)
    pic = np.random.default_rng(0).integers(0, 200, (32, 48, 3), dtype=np.uint8)
    made = []
    for img in (pic, pic.copy()):
        if made:
            img[20:24, 36:40] = 255
        px = proc([[PIL.fromarray(img)]], return_tensors="pt")
        ids = torch.tensor([[5, IMAGE, 6, 7, 8, 9]])
        cross = torch.zeros(1, 6, 1, 6, dtype=torch.long)
        cross[:, 1:] = px["aspect_ratio_mask"][:, None]
        made.append(dict(input_ids=ids, attention_mask=torch.ones_like(ids), cross_attention_mask=cross, **px))
    return model, made


def test_mllama_tiles_on_their_aspect_ratio_maps_equal_eager_and_planted_cell():
    model, (inputs, planted) = mllama_2x3()
    assert inputs["aspect_ratio_mask"].tolist() == [[[1] * 6]]
    layer = "model.language_model.layers.1.cross_attn"
    ref = eager(model, inputs)
    with torch.no_grad(), attncap.capture(model, relations="all", heads="all", layers=[layer]) as store:
        model(**inputs)
    full, keys = records_map(store, layer)
    tags = [f"tile {j} of 6: row {j // 3}, col {j % 3} of 2x3" for j in range(6)]
    assert [(k[2], k[3], k[4]) for k in keys] == [x for t in tags for x in (("cls", None, t), ("image", (4, 4), t))]
    torch.testing.assert_close(full, ref.attentions[1].double(), atol=1e-5, rtol=1e-5)
    _local_tower(model)
    seg, cell = planted_cell(model, inputs, planted, layer, "text->image")
    assert (keys[2 * seg + 1][4], divmod(cell, 4)) == (tags[5], (1, 1))


def test_mllama_aspect_ratio_that_does_not_hold_the_tiles_warns():
    model, (inputs, _) = mllama_2x3()
    wrong = dict(inputs, aspect_ratio_ids=torch.ones_like(inputs["aspect_ratio_ids"]))  # 1x1 for 6 real tiles
    with pytest.warns(UserWarning, match=r"mllama: the tile arrangement .* not recorded: aspect ratio 1x1 does not "
                                         r"hold the 6 real tiles"):
        with torch.no_grad(), attncap.capture(model, relations="text->image",
                                              layers=["model.language_model.layers.1.cross_attn"]) as store:
            model(**wrong)
    assert {r.meta["key_tag"] for r in store.records} == {f"tile {j} of 6" for j in range(6)}


def test_tower_records_of_several_images_tagged_with_their_image():
    """Qwen2-VL's and Qwen2.5-VL's towers encode two images in one call: each frame (and window) record
    says which image it is."""
    from test_capture_transformers import tiny_qwen2_5_vl, tiny_qwen2_vl

    grid = torch.tensor([[1, 4, 6], [1, 6, 4]])
    got = {}
    for name, build in (("qwen2_vl", tiny_qwen2_vl), ("qwen2_5_vl", tiny_qwen2_5_vl)):
        model = build()
        vc = model.config.vision_config
        pv = torch.randn(48, 3 * vc.temporal_patch_size * vc.patch_size ** 2, generator=torch.Generator().manual_seed(0))
        with torch.no_grad(), attncap.capture(model, relations="image->image", layers="*visual.blocks.*") as store:
            model.model.get_image_features(pixel_values=pv, image_grid_thw=grid)
        got[name] = [(r.layer.split(".")[-2], r.query_grid, r.meta.get("query_tag")) for r in store.records]
    assert got["qwen2_vl"] == [(b, g, t) for b in "01" for g, t in (((4, 6), "image 0 of 2"), ((6, 4), "image 1 of 2"))]
    # Qwen2.5-VL block 0: windows of at most 4x4 patches (2x2 merge units), block 1 full attention
    windows = [("0", (4, 4), "image 0 of 2, window 0 of 2: rows 0:4, cols 0:4 of (4, 6)"),
               ("0", (4, 2), "image 0 of 2, window 1 of 2: rows 0:4, cols 4:6 of (4, 6)"),
               ("0", (4, 4), "image 1 of 2, window 0 of 2: rows 0:4, cols 0:4 of (6, 4)"),
               ("0", (2, 4), "image 1 of 2, window 1 of 2: rows 4:6, cols 0:4 of (6, 4)")]
    assert got["qwen2_5_vl"] == windows + got["qwen2_vl"][2:]

