"""Refusals scoped to the layers a capture selects: a layer attncap cannot reproduce (training-mode
attention dropout; sinks with logit softcapping in its config) is refused before the forward when it
is selected, and left to the model's own attention (no refusal, exact maps elsewhere) when it is not.
"""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

import attncap  # noqa: E402
from test_capture_transformers import LM0, qwen_inputs, tiny_qwen2_vl  # noqa: E402
from test_capture_vlm_families import eager, tiny_gpt_oss  # noqa: E402

L0, L1 = "model.layers.0.self_attn", "model.layers.1.self_attn"


def refused_before_forward(model, inputs, match: str, **options) -> None:
    ran = []
    hook = model.register_forward_pre_hook(lambda *a: ran.append(1))
    try:
        with pytest.raises(ValueError, match=match):
            with attncap.capture(model, **options):
                model(**inputs)
    finally:
        hook.remove()
    assert ran == [] and model.config._attn_implementation == "eager"


def test_training_dropout_refused_only_where_selected():
    """GPT-OSS in training mode, attention dropout in layer 1 only: selecting layer 1 is refused,
    selecting layer 0 is not; layer 0's map equals eager and the logits are those of the same seed."""
    model = tiny_gpt_oss()
    model.model.layers[1].self_attn.attention_dropout = 0.5
    model.train()
    ids = torch.randint(3, 60, (1, 9), generator=torch.Generator().manual_seed(0))
    refused_before_forward(model, dict(input_ids=ids), r"model\.layers\.1\.self_attn has attention_dropout=0\.5",
                           layers=[L1])
    refused_before_forward(model, dict(input_ids=ids), r"model\.layers\.1\.self_attn has attention_dropout=0\.5")
    torch.manual_seed(1)
    ref = eager(model, dict(input_ids=ids))  # layer 1 drops at random: the same seed for every run
    with torch.no_grad():
        torch.manual_seed(1)
        plain = model(input_ids=ids).logits
        with attncap.capture(model, relations="all", heads="all", layers=[L0]) as store:
            torch.manual_seed(1)
            captured = model(input_ids=ids).logits
    assert not torch.equal(plain, model.eval()(input_ids=ids).logits)  # the dropout did drop something
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)
    (text,) = store.get(layer=L0, relation="text->text")
    torch.testing.assert_close(text.data.double(), ref.attentions[0].double(), atol=2e-6, rtol=1e-5)


def test_vlm_tower_dropout_does_not_refuse_language_model_layers():
    """Qwen2-VL training with dropout in its vision tower only: capturing a language-model layer runs."""
    model = tiny_qwen2_vl()
    for block in model.model.visual.blocks:
        block.attn.attention_dropout = 0.5
    model.train()
    inputs = qwen_inputs(batch=1)
    with torch.no_grad():
        torch.manual_seed(2)
        plain = model(**inputs).logits
        with attncap.capture(model, relations="text->image", layers=[LM0]) as store:
            torch.manual_seed(2)
            captured = model(**inputs).logits
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)
    assert [r.key_grid for r in store.records] == [(4, 6)]
    with pytest.raises(ValueError, match=r"model\.visual\.blocks\.0\.attn has attention_dropout=0\.5"):
        with attncap.capture(model, layers="model.visual.*"):
            raise AssertionError("the block must not run")


def test_sinks_with_softcapping_refused_at_install():
    """A config with logit softcapping on a model with attention sinks: refused before the forward
    (not at the first call), only for the layers that have both and are selected."""
    model = tiny_gpt_oss()
    ids = torch.randint(3, 60, (1, 7), generator=torch.Generator().manual_seed(0))
    model.config.attn_logit_softcapping = 30.0
    refused_before_forward(model, dict(input_ids=ids), r"model\.layers\.0\.self_attn has attention sinks and logit "
                                                       r"softcapping \(attn_logit_softcapping=30\.0\)")
    model.config.attn_logit_softcapping = None
    model.model.layers[1].self_attn.attn_logit_softcapping = 30.0  # one module shows it
    refused_before_forward(model, dict(input_ids=ids), r"model\.layers\.1\.self_attn has attention sinks", layers=[L1])
    with torch.no_grad(), attncap.capture(model, relations="text->sink", layers=[L0]) as store:
        model(input_ids=ids)
    assert [r.layer for r in store.records] == [L0]
