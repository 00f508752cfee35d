"""attncap.capture on the VLM families of tests/tiny_vlms.py, and on attention variants (sinks, softcap,
eager-only models).

Per family: the language model's maps equal eager attention weights (every relation, every head),
with the image tokens split into the segments the family's layout has (grid, anyres base tile,
newlines, Pixtral breaks, tiles), each on its grid; a patch planted in the pixels moves exactly the
key column of its grid cell; generate() gives the same tokens and keeps the grids at every step.
The expected layouts here are written from the families' processors, independently of attncap's rules.
"""
from __future__ import annotations

import re
import sys
import warnings

import pytest
import torch

pytest.importorskip("transformers")

import attncap  # noqa: E402
from attncap.integrations import vlm_media  # noqa: E402
from tiny_vlms import BREAK, END, IMAGE, PAD, VLMS, set_attention_dropout, vlm_inputs  # noqa: E402

FAMILIES = sorted(n for n in VLMS if n != "llama4")  # Llama 4's forward fails in transformers 5.24 itself
LM_LAYER = re.compile(r"(language_model|text_model)(\.model)?\.layers\.(\d+)\.self_attn$")


@pytest.fixture(scope="module", params=FAMILIES)
def family(request):
    model = VLMS[request.param][0]()
    return request.param, model, vlm_inputs(request.param, model)


def lm_layers(model) -> list[str]:
    return sorted((n for n, _ in model.named_modules() if LM_LAYER.search(n)),
                  key=lambda n: int(LM_LAYER.search(n).group(3)))


def expected_layout(name: str, ids: torch.Tensor) -> list[tuple[str, list[int], tuple | None]]:
    """(segment, positions, grid) of the image tokens of ids [1, N], from the processors' conventions."""
    row = ids[0]
    pos = (row == IMAGE).nonzero().flatten().tolist()
    if name in ("llava_next", "llava_onevision"):  # base tile 4x4, then rows of 8 stitched tokens + newline
        rest = pos[16:]
        hires = [p for i, p in enumerate(rest) if i % 9 != 8]
        newline = [p for i, p in enumerate(rest) if i % 9 == 8]
        return [("image", pos[:16], (4, 4)), ("image", hires, (len(newline), 8)), ("image_newline", newline, None)]
    if name in ("idefics3", "smolvlm"):  # two real tiles of 4x4 (the blank third is dropped)
        return [("image", pos[:16], (4, 4)), ("image", pos[16:], (4, 4))]
    if name == "mistral3":
        return [("image", pos, (4, 6)), ("image_break", (row == BREAK).nonzero().flatten().tolist(), None),
                ("image_end", (row == END).nonzero().flatten().tolist(), None)]
    return [("image", pos, {"kimi_k25": (4, 6), "paligemma": (8, 8)}.get(name, (4, 4)))]


def order_of(name: str, ids: torch.Tensor) -> torch.Tensor:
    """Positions in attncap's segment order: text, then each expected segment."""
    media = sorted(p for _, ps, _ in expected_layout(name, ids) for p in ps)
    text = [p for p in range(ids.shape[1]) if p not in set(media)]
    return torch.tensor([text + [p for _, ps, _ in expected_layout(name, ids) for p in ps]])


def assemble(store, layer: str, step: int = 0):
    """The [B, H, Nq, Nk] map of one call from its relation records, and its key segments
    [(start, stop, name, grid)] in order."""
    recs = store.get(layer=layer, step=step)
    qsegs = sorted({tuple(r.meta["query_segment"]) for r in recs})
    ksegs = sorted({tuple(r.meta["key_segment"]) + (r.relation.split("->")[1], r.key_grid) for r in recs})
    full = torch.full(recs[0].data.shape[:2] + (qsegs[-1][1], ksegs[-1][1]), float("nan"), dtype=torch.float64)
    for r in recs:
        (q0, q1), (k0, k1) = r.meta["query_segment"], r.meta["key_segment"]
        full[:, :, q0:q1, k0:k1] = r.data.double()
    return full, ksegs


def eager(model, inputs):
    before = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation(before)


# ----------------------------------------------------------------------------------- families
def test_lm_maps_equal_eager_with_image_segments_on_their_grids(family):
    name, model, inputs = family
    ref = eager(model, inputs)
    with torch.no_grad():
        plain = model(**inputs).logits
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # a known family must not fall back to grid-less segments
            with attncap.capture(model, relations="all", heads="all", layers=lm_layers(model)) as store:
                captured = model(**inputs).logits
    # InternVL / Aya Vision: the tile arrangement is not in the model's inputs, and the capture says so
    said = [str(w.message) for w in caught]
    assert said == ([] if name not in ("internvl", "aya_vision") else
                    [f"attncap: {name}: the tile arrangement of its images (rows x cols of tiles, global view) is "
                     f"not recorded: {vlm_media.NOT_IN_INPUTS[name]}; each tile keeps its grid"])
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(captured, ref.logits, atol=1e-4, rtol=1e-4)
    expected = expected_layout(name, inputs["input_ids"])
    order = order_of(name, inputs["input_ids"])
    for i, layer in enumerate(lm_layers(model)):
        full, ksegs = assemble(store, layer)
        assert [(s[2], s[1] - s[0], s[3]) for s in ksegs[1:]] == [(n, len(p), g) for n, p, g in expected]
        want = ref.attentions[i].double()[:, :, order[0]][:, :, :, order[0]]
        torch.testing.assert_close(full, want, atol=2e-6, rtol=1e-5)
    tower = [r for r in store.records if r.layer not in lm_layers(model)]
    assert tower == []  # layers= kept the towers out


# (pixel tensor index, patch row, patch col) planted -> (image segment index, grid cell) it must move
PLANTS = {
    "aya_vision": ((0,), 5, 2, 0, (2, 1)), "internvl": ((0,), 5, 2, 0, (2, 1)), "gemma3": ((0,), 5, 2, 0, (2, 1)),
    "idefics3": ((0, 1), 5, 2, 1, (2, 1)), "smolvlm": ((0, 1), 5, 2, 1, (2, 1)), "mistral3": ((0,), 5, 9, 0, (2, 4)),
    "paligemma": ((0,), 5, 2, 0, (5, 2)), "llava_onevision": ((0, 2), 2, 1, 1, (1, 5)),
    # right-hand anyres tile, patch (2, 1): stitched column 4 + 1; unpadding dropped the top row
    "llava_next": ((0, 2), 2, 1, 1, (1, 5)), "kimi_k25": (None, 5, 9, 0, (2, 4)),
}


def text_to_image_records(model, layer: str, inputs_list) -> list[list]:
    """For each of ``inputs_list``: the text->image records of ``layer`` (every head) from one
    captured forward, in key-segment order (one per image segment)."""
    captured = []
    for inp in inputs_list:
        with torch.no_grad(), attncap.capture(model, relations="text->image", heads="all", layers=[layer]) as st:
            model(**inp)
        captured.append(sorted(st.get(layer=layer), key=lambda rec: rec.meta["key_segment"][0]))
    return captured


def _local_tower(model) -> None:
    """Zero every linear layer of the vision encoder blocks: each block then adds nothing to its residual
    stream, so an image token depends on its own patches only (embeddings, norms and merges are local)."""
    blocks = re.compile(r"(vision_tower|vision_model|visual)\..*(layers|layer|blocks)\.\d+\.")
    with torch.no_grad():
        for n, m in model.named_modules():
            if blocks.search(n) and isinstance(m, torch.nn.Linear):
                m.weight.zero_()
                if m.bias is not None:
                    m.bias.zero_()


@pytest.mark.parametrize("name", sorted(PLANTS))
def test_planted_patch_moves_its_grid_cell(name):
    model = VLMS[name][0]()
    inputs = vlm_inputs(name, model)
    _local_tower(model)
    where, r, c, seg, cell = PLANTS[name]
    planted = dict(inputs, pixel_values=inputs["pixel_values"].clone())
    p = inputs.get("pixel_values").shape[-1] if where is None else model.config.vision_config.patch_size
    p = p[0] if isinstance(p, list) else p
    if where is None:  # Kimi: pixel_values are the row-major patches themselves, [h * w, C, p, p]
        planted["pixel_values"][r * 12 + c] += 30
    else:
        planted["pixel_values"][where][..., r * p:(r + 1) * p, c * p:(c + 1) * p] += 30
    layer = lm_layers(model)[0]
    captured = text_to_image_records(model, layer, (inputs, planted))
    rows = [[rec.data[0, :, -1].double() for rec in recs] for recs in captured]  # the last text token, every head
    grids = [rec.key_grid for rec in captured[-1]]
    # A changed key moves its own column; every other column only rescales by the same per-head factor.
    shift = [(a / b).log() for a, b in zip(rows[1], rows[0])]
    median = torch.cat(shift, -1).median(-1, keepdim=True).values
    dev = [(s - median).abs().amax(0) for s in shift]
    best = max(range(len(dev)), key=lambda i: float(dev[i].max()))
    flat = int(dev[best].argmax())
    assert (best, divmod(flat, grids[best][1])) == (seg, cell)
    others = torch.cat([d for i, d in enumerate(dev) if i != best] + [dev[best][torch.arange(dev[best].numel()) != flat]])
    assert float(others.max()) < 1e-4 < float(dev[best][flat])


@pytest.mark.parametrize("name", FAMILIES)
def test_generate_keeps_grids_and_tower_records(name):
    model = VLMS[name][0]()
    inputs = vlm_inputs(name, model)
    kw = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False, pad_token_id=PAD)
    layer = lm_layers(model)[0]
    with torch.no_grad():
        plain = model.generate(**inputs, **kw)
        with attncap.capture(model, relations="all", heads="mean") as store:
            captured = model.generate(**inputs, **kw)
    assert torch.equal(plain, captured)
    want = [(n, g) for n, _, g in expected_layout(name, inputs["input_ids"])]
    for step in range(3):
        recs = sorted([r for r in store.get(layer=layer, step=step) if r.relation.startswith("text->")
                       and r.relation != "text->text"], key=lambda r: r.meta["key_segment"][0])
        assert [(r.relation.split("->")[1], r.key_grid) for r in recs] == want, step
        n_media = sum(len(p) for _, p, _ in expected_layout(name, inputs["input_ids"]))
        assert recs[0].data.shape[2] == (inputs["input_ids"].shape[1] - n_media if step == 0 else 1)
    tower = [r for r in store.records if "vision" in r.layer]
    assert tower and {r.step for r in tower} == {0} and all(r.query_grid is not None for r in tower
                                                              if r.relation == "image->image")


@pytest.mark.parametrize("name", sorted(VLMS))
def test_training_mode_attention_dropout_refused_before_the_forward(name):
    """Dropout inside attention is random: attncap cannot reproduce it, so capture refuses before any
    forward runs (the model's own forward hook never fires) and names the setting."""
    model = VLMS[name][0]()
    inputs = vlm_inputs(name, model) if name != "llama4" else {}
    assert set_attention_dropout(model, 0.1) > 0
    model.train()
    ran = []
    hook = model.register_forward_pre_hook(lambda *a: ran.append(1))
    with pytest.raises(ValueError, match=r"dropout=0\.1 and the model is in training mode.*model\.eval\(\)"):
        with attncap.capture(model):
            model(**inputs)
    hook.remove()
    assert ran == [] and model.config._attn_implementation != "attncap"


def test_tiles_of_a_batch_keep_their_grids_and_numbers():
    """Idefics3, two prompts: each element's images are numbered within it, and both keep their grids."""
    model = VLMS["idefics3"][0]()
    one = vlm_inputs("idefics3", model)
    inputs = {k: torch.cat([v, v]) for k, v in one.items()}
    layer = lm_layers(model)[0]
    with torch.no_grad(), attncap.capture(model, relations="text->image", heads="mean", layers=[layer]) as store:
        model(**inputs)
    recs = sorted(store.records, key=lambda r: r.meta["key_segment"][0])
    assert [(r.key_grid, r.meta["key_tag"], r.data.shape[0]) for r in recs] == [((4, 4), "image 0 of 2", 2),
                                                                                 ((4, 4), "image 1 of 2", 2)]


def test_tokens_select_text_keys_not_break_tokens():
    """tokens= picks prompt words: Pixtral's [IMG_BREAK] / [IMG_END] segments keep whole maps."""
    model = VLMS["mistral3"][0]()
    inputs = vlm_inputs("mistral3", model)
    with torch.no_grad(), attncap.capture(model, relations="all", tokens=[1], layers=lm_layers(model)[:1]) as store:
        model(**inputs)
    kinds = {r.relation.split("->")[1]: r.kind for r in store.records if r.relation.startswith("text->")}
    assert kinds == {"text": "tokens", "image": "map", "image_break": "map", "image_end": "map"}


def test_unknown_layout_warns_and_has_no_grid(monkeypatch):
    """A family attncap has no rule for: grid-less image segments and a warning, never a guessed grid."""

    model = VLMS["aya_vision"][0]()
    inputs = vlm_inputs("aya_vision", model)
    monkeypatch.delitem(vlm_media.RULES, "aya_vision")
    with pytest.warns(UserWarning, match="knows no image token layout for model_type 'aya_vision'"):
        with torch.no_grad(), attncap.capture(model, relations="text->image", layers=lm_layers(model)[:1]) as store:
            model(**inputs)
    (rec,) = store.records
    assert rec.key_grid is None and rec.data.shape[-1] == 16


def test_llama4_tower_class_token_last():
    """Llama 4's tower appends its class token after the patches; capture names it where it is."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    model = VLMS["llama4"][0]()
    pixels = VLMS["llama4"][1](model)["pixel_values"]
    seen = []

    def recording(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
        out, w = sys.modules[type(module).__module__].vision_eager_attention_forward(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kw)
        seen.append(w.double())
        return out, w

    AttentionInterface.register("attncap_test_rec", recording)
    AttentionMaskInterface.register("attncap_test_rec", eager_mask)
    model.set_attn_implementation("attncap_test_rec")
    with torch.no_grad():
        model.get_image_features(pixel_values=pixels)
    model.set_attn_implementation("sdpa")
    with torch.no_grad(), attncap.capture(model, relations="all", heads="all", layers="vision_model.*") as store:
        model.get_image_features(pixel_values=pixels)  # as generate() does, before any forward
    full, ksegs = assemble(store, "vision_model.model.layers.0.self_attn")
    assert [(s[2], s[1] - s[0], s[3]) for s in ksegs] == [("image", 64, (8, 8)), ("cls", 1, None)]
    torch.testing.assert_close(full, seen[0], atol=2e-6, rtol=1e-5)


# ----------------------------------------------------------------------------------- attention variants
def tiny_gpt_oss(seed: int = 0):
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(seed)
    cfg = GptOssConfig(vocab_size=64, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
                       num_experts_per_tok=1, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
                       max_position_embeddings=64, pad_token_id=PAD, rope_parameters={"rope_type": "default",
                                                                                      "rope_theta": 10000.0})
    model = GptOssForCausalLM(cfg).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.sinks.normal_(0, 2)  # released weights have sinks of this size, zeros would hide bugs
    return model


def test_attention_sinks_exact_and_generate_unchanged():
    model = tiny_gpt_oss()
    assert model.config._attn_implementation == "eager"  # GPT-OSS does not support SDPA
    ids = torch.randint(3, 60, (2, 11), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    ref = eager(model, dict(input_ids=ids, attention_mask=mask))
    with torch.no_grad(), attncap.capture(model, relations="all", heads="all") as store:
        logits = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    torch.testing.assert_close(logits[valid], ref.logits[valid], atol=1e-5, rtol=1e-5)
    for i in range(2):
        layer = f"model.layers.{i}.self_attn"
        (text,) = store.get(layer=layer, relation="text->text")
        (sink,) = store.get(layer=layer, relation="text->sink")
        rows = valid[:, None, :, None]
        torch.testing.assert_close(torch.where(rows, text.data.double(), 0),
                                   torch.where(rows, ref.attentions[i].double(), 0), atol=2e-6, rtol=1e-5)
        total = text.data.sum(-1) + sink.data[..., 0]
        torch.testing.assert_close(total[valid[:, None].expand_as(total)], torch.ones(int(valid.sum()) * 4))
        assert float(sink.data[valid[:, None].expand_as(total)].min()) > 1e-3  # sinks really took mass
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=PAD)
    with torch.no_grad():
        plain = model.generate(input_ids=ids, attention_mask=mask, **kw)
        # layer 1 is left alone: it must run the model's own eager attention, sinks included
        with attncap.capture(model, layers=["model.layers.0.self_attn"], heads="all") as store:
            captured = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(plain, captured) and model.config._attn_implementation == "eager"
    assert sorted({r.step for r in store.records}) == [0, 1, 2, 3]


def test_attention_sinks_in_bfloat16_within_twice_eager_error():
    """In bf16 the sink's probability (its logit rides in two extra q dims) stays within twice eager
    bf16's error, both against fp32 eager: the project's low-precision rule."""
    model = tiny_gpt_oss()
    ids = torch.randint(3, 60, (2, 11), generator=torch.Generator().manual_seed(1))
    ref = eager(model, dict(input_ids=ids))
    model.to(torch.bfloat16)
    low = eager(model, dict(input_ids=ids))
    with torch.no_grad(), attncap.capture(model, relations="text->sink", heads="all") as store:
        model(input_ids=ids)
    for i in range(2):
        want = 1 - ref.attentions[i].double().sum(-1)
        (sink,) = store.get(layer=f"model.layers.{i}.self_attn")
        err = float((sink.data[..., 0].double() - want).abs().max())
        assert err <= 2 * float((1 - low.attentions[i].double().sum(-1) - want).abs().max())


def tiny_gemma2(cap: float | None):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                                           sliding_window=4, attn_logit_softcapping=cap, pad_token_id=PAD)).eval()
    # Scores of several units (random init gives ~0.01), so tanh is far from linear at cap 2 and a
    # capture that ignored the cap would be caught. Layer 0 slides (window 4), layer 1 is global.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.normal_(0, 1.0)
            layer.self_attn.k_proj.weight.normal_(0, 1.0)
    return model


def test_logit_softcapping_exact():
    model = tiny_gemma2(2.0)
    ids = torch.randint(3, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding
    ref = eager(model, dict(input_ids=ids, attention_mask=mask))
    uncapped = tiny_gemma2(None)
    uncapped.load_state_dict(model.state_dict())
    loose = eager(uncapped, dict(input_ids=ids, attention_mask=mask))
    with torch.no_grad():
        plain = model(input_ids=ids, attention_mask=mask).logits
        with attncap.capture(model, relations="all", heads="all") as store:
            logits = model(input_ids=ids, attention_mask=mask).logits
    valid = mask.bool()
    # padding rows see no key: attncap gives them zeros, eager a uniform row; only real tokens are compared
    torch.testing.assert_close(logits[valid], plain[valid], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logits[valid], ref.logits[valid], atol=1e-5, rtol=1e-5)
    rows = valid[:, None, :, None]
    for i in range(2):
        (text,) = store.get(layer=f"model.layers.{i}.self_attn", relation="text->text")
        got, want = (torch.where(rows, x.double(), 0) for x in (text.data, ref.attentions[i]))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert float((got - torch.where(rows, loose.attentions[i].double(), 0)).abs().max()) > 1e-2  # the cap bites


def test_image_token_id_found_in_vision_config():
    """Phi-4-multimodal keeps image_token_id in vision_config; it must not be labelled text."""
    from transformers import Phi4MultimodalConfig

    from attncap.integrations.transformers import _token_ids

    cfg = Phi4MultimodalConfig()

    class Holder(torch.nn.Module):
        config = cfg

    ids = _token_ids(Holder(), [cfg.vision_config, cfg.audio_config])
    assert ids["image"] == cfg.vision_config.image_token_id
