"""Capture wherever diffusers computes attention: every dispatcher backend, classic processors, and
never an empty store in silence.

A tiny Wan 2.1 transformer runs on diffusers' native backend to record the q and k of every call
(ground truth); the same forward then runs captured on another backend (_native_math, flex, and a
backend registered for the test that never calls SDPA). Every record must equal the float64
softmax of the recorded q and k, the output must equal the backend's own output, and after the
block the backend registry must hold the user's functions again.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import attncap
from family_harness import check_records, first_tensor, record_calls
from tiny_pipelines import sd_inputs, tiny_sd
from tiny_transformers import tiny_wan

pytestmark = pytest.mark.usefixtures("one_thread")

VIDEO_GRID = (3, 3, 5)
TEXT = 12


def wan_model():
    return tiny_wan().transformer.eval()


def wan_call(model):
    """One forward of ``model`` on fixed random inputs, on the model's device and dtype."""
    g = torch.Generator().manual_seed(3)
    param = next(model.parameters())
    x = torch.randn(1, model.config.in_channels, 3, 6, 10, generator=g).to(param)
    ctx = torch.randn(1, TEXT, model.config.text_dim, generator=g).to(param)
    return lambda: model(x, torch.tensor([700.0], device=param.device), ctx)


NV = 3 * 3 * 5
WAN_LAYOUT = {"*attn1": [({"video": (0, NV, VIDEO_GRID)}, {"video": (0, NV, VIDEO_GRID)})],
              "*attn2": [({"video": (0, NV, VIDEO_GRID)}, {"text": (0, TEXT, None)})]}


def _registry():
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    return _AttentionBackendRegistry


def _explicit_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                        enable_gqa=False, return_lse=False, _parallel_config=None):
    """A backend that never calls SDPA: [B, N, H, D] softmax(q k^T) v written out."""
    q, k, v = (x.transpose(1, 2).float() for x in (query, key, value))
    s = q @ k.transpose(-1, -2) * (q.shape[-1] ** -0.5 if scale is None else scale)
    return (s.softmax(-1) @ v).transpose(1, 2).to(query.dtype)


def _use_backend(model, name):
    """Point every processor at backend ``name`` as set_attention_backend does (without its checks)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    for module in model.modules():
        if hasattr(module, "processor"):
            module.processor._attention_backend = AttentionBackendName(name)


@pytest.fixture
def test_backend():
    """Register _explicit_attention under the xformers name for this test (xformers is not installed)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    registry = _registry()
    name = AttentionBackendName.XFORMERS
    saved = registry._backends.get(name), registry._supported_arg_names.get(name)
    registry._backends[name] = _explicit_attention
    registry._supported_arg_names[name] = ["query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale",
                                           "enable_gqa", "return_lse", "_parallel_config"]
    yield name.value
    registry._backends[name], registry._supported_arg_names[name] = saved


@pytest.mark.parametrize("backend", ["_native_math", "flex", "test_backend"])
def test_every_backend_is_captured_exactly(backend, request):
    model = wan_model()
    call = wan_call(model)
    truth, _ = record_calls(model, "transformer", call)
    name = request.getfixturevalue("test_backend") if backend == "test_backend" else backend
    _use_backend(model, name)
    before = dict(_registry()._backends)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # flex on CPU warns that it runs uncompiled
        with torch.no_grad():
            plain = first_tensor(call())
        with attncap.capture(model, relations="all", pool=(2, 2, 2), stats=("entropy", "colsum")) as store, \
                torch.no_grad():
            out = first_tensor(call())
    assert dict(_registry()._backends) == before, "the backend registry was not restored"
    torch.testing.assert_close(out, plain, atol=2e-5, rtol=1e-4)
    check_records(store, truth, WAN_LAYOUT, pool=(2, 2, 2), stats=("entropy", "colsum"))
    assert len(store.records) == 2 * 2 * 3  # two blocks x (attn1, attn2) x (map, entropy, colsum)


def test_registry_restored_after_an_exception():
    model = wan_model()
    before = dict(_registry()._backends)
    with pytest.raises(RuntimeError, match="boom"):
        with attncap.capture(model):
            assert all(hasattr(f, "__attncap_original__") for f in _registry()._backends.values())
            raise RuntimeError("boom")
    assert dict(_registry()._backends) == before


def test_classic_processor_records_equal_sdpa_processor_records():
    """AttnProcessor computes probabilities with get_attention_scores (no SDPA): same maps, same image."""
    from diffusers.models.attention_processor import AttnProcessor

    pipe = tiny_sd()
    with attncap.capture(pipe, relations="all", stats=("entropy",)) as reference:
        pipe(**sd_inputs())
    pipe.unet.set_attn_processor(AttnProcessor())
    plain = pipe(**sd_inputs()).images
    with attncap.capture(pipe, relations="all", stats=("entropy",)) as store:
        image = pipe(**sd_inputs()).images
    torch.testing.assert_close(image, plain)
    key = lambda r: (r.layer, r.step, r.branch, r.relation, r.kind)
    assert sorted(map(key, store.records)) == sorted(map(key, reference.records)) and store.records
    want = {key(r): r.data for r in reference.records}
    for r in store.records:
        torch.testing.assert_close(r.data, want[key(r)], atol=2e-5, rtol=1e-4)


class HandWrittenProcessor:
    """Attention that neither SDPA, the dispatcher nor get_attention_scores sees."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        q, k, v = (attn.head_to_batch_dim(x) for x in (q, k, v))
        p = (torch.bmm(q, k.transpose(1, 2)) * attn.scale).softmax(-1)
        out = attn.batch_to_head_dim(torch.bmm(p, v))
        return attn.to_out[1](attn.to_out[0](out))


def test_a_layer_whose_attention_is_not_intercepted_is_an_error_not_an_empty_store():
    pipe = tiny_sd()
    attn = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    attn.set_processor(HandWrittenProcessor())
    layer = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    with pytest.raises(attncap.CaptureIncomplete, match="does not intercept") as err:
        with attncap.capture(pipe) as store:
            pipe(**sd_inputs())
    assert layer in str(err.value)
    assert store.records and all(r.layer != layer for r in store.records)  # what was captured is kept
    with pytest.warns(UserWarning, match=layer):
        with attncap.capture(pipe, strict=False) as store:
            pipe(**sd_inputs())
    assert store.records


def test_relations_the_family_cannot_offer_fail_before_the_run():
    pipe = tiny_sd()
    calls = []
    hook = pipe.unet.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        for bad in ("imag->text", "video->text"):
            with pytest.raises(ValueError, match="relations") as err:
                with attncap.capture(pipe, relations=bad):
                    pipe(**sd_inputs())
            assert "image->text" in str(err.value) and bad in str(err.value)
    finally:
        hook.remove()
    assert not calls


def test_a_relation_no_selected_layer_offers_is_an_error_at_the_end():
    pipe = tiny_sd()
    with pytest.raises(attncap.CaptureIncomplete, match="image->text"):
        with attncap.capture(pipe, layers="*attn1", relations="image->text"):
            pipe(**sd_inputs())


@pytest.mark.parametrize("offload", ["group_leaf", "group_block", "model"])
def test_offloaded_pipelines_capture_the_same_records(offload):
    """Group offloading (leaf / block level) and model CPU offload (onload device: the CPU here) move
    weights around the attention modules; the records and the image must not change."""
    pipe = tiny_sd()
    with attncap.capture(pipe, relations="all") as reference:
        want_image = pipe(**sd_inputs()).images
    pipe = tiny_sd()
    if offload == "model":
        pipe.enable_model_cpu_offload(device="cpu")
    else:
        pipe.unet.enable_group_offload(onload_device=torch.device("cpu"), num_blocks_per_group=1,
                                       offload_type="leaf_level" if offload == "group_leaf" else "block_level")
    with attncap.capture(pipe, relations="all") as store:
        image = pipe(**sd_inputs()).images
    torch.testing.assert_close(image, want_image)
    key = lambda r: (r.layer, r.step, r.branch, r.relation, r.kind)
    want = {key(r): r.data for r in reference.records}
    assert sorted(map(key, store.records)) == sorted(want)
    for r in store.records:
        torch.testing.assert_close(r.data, want[key(r)])


GPU_BACKENDS = [("_native_flash", None), ("_native_cudnn", None), ("_native_efficient", None), ("flash", "flash_attn"),
                ("_flash_3", "flash_attn_interface"), ("sage", "sageattention"), ("xformers", "xformers")]


@pytest.mark.parametrize("backend,package", GPU_BACKENDS, ids=[b for b, _ in GPU_BACKENDS])
def test_gpu_backends_are_captured(backend, package):
    """The CUDA-only backends: maps against the recorded q, k; output within the backend's own precision."""
    import importlib.util

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: the backend runs on CUDA only")
    if package is not None and importlib.util.find_spec(package) is None:
        pytest.skip(f"backend {backend!r} needs the {package} package, which is not installed")
    model = wan_model().to("cuda", torch.bfloat16)
    call = wan_call(model)
    truth, _ = record_calls(model, "transformer", call)
    _use_backend(model, backend)
    with torch.no_grad():
        plain = first_tensor(call()).float()
        with attncap.capture(model, relations="all", pool=(2, 2, 2), stats=("entropy", "colsum")) as store:
            out = first_tensor(call()).float()
    # bf16 activations: the captured output differs from the backend's by bf16 rounding of the attention
    assert (out - plain).norm() <= 2e-2 * plain.norm()
    check_records(store, truth, WAN_LAYOUT, pool=(2, 2, 2), stats=("entropy", "colsum"), atol=2e-3)


def test_generic_capture_of_a_diffusers_model_on_flex():
    """layout= captures a diffusers model generically; its dispatcher's backends are routed too."""
    model = wan_model()
    call = wan_call(model)
    _use_backend(model, "flex")
    layout = [("video", NV, VIDEO_GRID), ("text", TEXT, None)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            plain = first_tensor(call())
        with attncap.capture(model, layout=layout, layers="*attn2") as store, torch.no_grad():
            out = first_tensor(call())
    torch.testing.assert_close(out, plain, atol=2e-5, rtol=1e-4)
    assert {(r.layer, r.relation) for r in store.records} == {
        ("blocks.0.attn2", "video->text"), ("blocks.1.attn2", "video->text")}
