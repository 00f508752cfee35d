"""relations="full" (one record per call over every query and key, in sequence order) and pipeline calls
(records carry the call they came from; each call's prompt labels its own maps)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import attncap

pytestmark = pytest.mark.usefixtures("one_thread")


class Recorder(torch.nn.Module):
    """A joint-attention layer over [image (2x2), text (3)] that keeps its q and k for the reference."""

    def __init__(self):
        super().__init__()
        self.proj = torch.nn.Linear(8, 24)

    def forward(self, x):
        q, k, v = self.proj(x).reshape(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        self.qk = (q.detach().double(), k.detach().double())
        return F.scaled_dot_product_attention(q, k, v)


def test_full_is_the_whole_softmax_beside_the_segment_records():
    model = Recorder()
    layout = [("image", 4, (2, 2)), ("text", 3, None)]
    with attncap.capture(model, layout=layout, relations=["full", "image->text"], heads="all",
                         stats=("entropy",)) as store:
        model(torch.randn(2, 7, 8))
    q, k = model.qk
    want = torch.softmax(q @ k.transpose(-1, -2) / 2.0, -1)   # head dim 4: scale 1/2
    full = store.get(relation="full")[0]
    assert full.data.shape == (2, 2, 7, 7) and full.query_grid is None and full.key_grid is None
    torch.testing.assert_close(full.data.double(), want, atol=1e-6, rtol=1e-5)
    segment = store.get(relation="image->text")[0]
    torch.testing.assert_close(segment.data, full.data[:, :, :4, 4:], atol=0, rtol=0)
    entropy = store.get(relation="full", kind="entropy")[0].data.double()
    torch.testing.assert_close(entropy, -(want * want.log()).sum(-1), atol=1e-5, rtol=1e-5)


def test_full_of_a_vlm_equals_output_attentions():
    """A tiny LLaVA (left-padded batch, 36 image tokens): the language model's full record is eager
    attention's weights in sequence order, while the segment records gather text and image apart."""
    from test_capture_transformers import LM0, eager_lm_attentions, llava_inputs, tiny_llava

    model, inputs = tiny_llava(), llava_inputs()
    _, eager = eager_lm_attentions(model, inputs)
    with torch.no_grad(), attncap.capture(model, relations=["full", "text->image"], heads="all",
                                          layers="model.language_model.*") as store:
        model(**inputs)
    valid = inputs["attention_mask"].bool()[:, None, :, None]   # padded queries: eager's rows are junk
    for i, weights in enumerate(eager):
        full = store.get(layer=LM0.replace(".0.", f".{i}."), relation="full")[0].data
        assert full.shape == weights.shape == (2, 4, 41, 41)
        torch.testing.assert_close(torch.where(valid, full.double(), 0), torch.where(valid, weights.double(), 0),
                                   atol=2e-6, rtol=1e-5)
    assert store.get(layer=LM0, relation="text->image")[0].key_grid == (6, 6)


def test_full_of_a_joint_dit_is_its_text_image_sequence():
    """Flux's double block attends over [text, image]: the full record holds both, in that order."""
    from tiny_transformers import FLUX_TEXT, flux_inputs, tiny_flux

    pipe = tiny_flux()
    layer = "transformer.transformer_blocks.0.attn"
    with attncap.capture(pipe, relations=["full", "all"], layers=layer, steps=[0]) as store:
        pipe(**flux_inputs(steps=1))
    full = store.get(relation="full")[0].data
    nt, ni = FLUX_TEXT, 8 * 12
    assert full.shape == (1, 1, nt + ni, nt + ni)
    torch.testing.assert_close(full.sum(-1), torch.ones(1, 1, nt + ni), atol=1e-5, rtol=0)
    text, image = slice(0, nt), slice(nt, None)
    for relation, rows, cols in (("text->text", text, text), ("image->text", image, text), ("text->image", text, image),
                                 ("image->image", image, image)):
        torch.testing.assert_close(store.get(relation=relation)[0].data, full[:, :, rows, cols], atol=1e-7, rtol=0)


def test_two_pipeline_calls_number_their_own_steps():
    from tiny_pipelines import sd_inputs, tiny_sd

    pipe = tiny_sd()
    with attncap.capture(pipe, layers="*attn2") as store:
        pipe(**sd_inputs(steps=3))
        pipe(**sd_inputs(steps=2))
    assert sorted({(r.call, r.step) for r in store}) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    with pytest.raises(ValueError, match=r"steps=\[2\]: this run has 2 denoising steps"):
        with attncap.capture(pipe, layers="*attn2", steps=[2]):
            pipe(**sd_inputs(steps=3))
            pipe(**sd_inputs(steps=2))   # step 2 exists in the first call only: the second one says so


def test_each_call_keeps_its_prompt_so_words_label_the_right_maps():
    from attncap.demo_model import load_pipeline

    pipe = load_pipeline()
    pipe.set_progress_bar_config(disable=True)
    prompts = ["a red circle and a blue square", "a blue square and a red circle"]
    with attncap.capture(pipe, layers="*attn2", relations="image->text", steps="last") as store:
        for prompt in prompts:
            pipe(prompt, num_inference_steps=2, generator=torch.Generator().manual_seed(0))
    assert [store.tokens_of(c)["prompt"] for c in (0, 1)] == prompts and store.tokens == store.tokens_of(0)
    for call, position in ((0, 2), (1, 6)):   # "circle" is token 2 of the first prompt, token 6 of the second
        recs = store.get(call=call, layer="*down_blocks.1*")
        want = torch.stack([r.data[0, :, :, position].mean(0) for r in recs]).mean(0).reshape(16, 16)
        torch.testing.assert_close(store.token_map("circle", call=call, layer="*down_blocks.1*"), want)
