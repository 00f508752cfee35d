"""Every capture option is checked before any work, and errors name the argument and what would work.

Three moments: attncap.capture(...) itself (types and values, before anything is installed); the
first denoiser call (steps against the run's step count, token indices against the text, heads
against the layer's heads: before that call's attention runs); and entering / threads (a capture
object entered twice, overlapping blocks, a second thread). Each case checks the error type, that
the message names the argument, and that nothing ran before it.
"""
from __future__ import annotations

import threading

import pytest
import torch
import torch.nn.functional as F

import attncap

pytestmark = pytest.mark.usefixtures("one_thread")


class Joint(torch.nn.Module):
    """A one-layer joint-attention model: 2 heads over 6 tokens (SDPA inside), counting its calls."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.Linear(8, 24)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        q, k, v = self.attn(x).reshape(x.shape[0], x.shape[1], 3, 2, 4).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v)


def untouched(model: torch.nn.Module) -> bool:
    """The model never ran and holds no hook of attncap's."""
    return model.calls == 0 and not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())


BAD_OPTIONS = [
    (dict(pool=2.5), TypeError, r"pool must be a positive int"),
    (dict(pool=(2, 0)), ValueError, r"pool factors are >= 1"),
    (dict(pool="4"), TypeError, r"pool must be"),
    (dict(pool=(1, 2, 2, 2)), ValueError, r"pool must be an int or 2 / 3 factors"),
    (dict(steps=2.5), TypeError, r"steps must be 'all', 'last', a step index"),
    (dict(steps=[-1]), ValueError, r"steps holds step indices \(ints >= 0\); got -1; steps='last' takes the final"),
    (dict(steps="first"), ValueError, r"steps must be 'all', 'last'"),
    (dict(steps=[]), ValueError, r"steps is empty"),
    (dict(steps=[0, True]), TypeError, r"steps holds step indices"),
    (dict(stats="entropi"), ValueError, r"stats \['entropi'\] unknown; choose from"),
    (dict(stats=[1]), TypeError, r"stats holds names"),
    (dict(heads=2.5), TypeError, r"heads must be 'mean', 'all' or a list of head indices"),
    (dict(heads="first"), ValueError, r"heads must be 'mean', 'all'"),
    (dict(heads=[0, "1"]), TypeError, r"heads holds head indices"),
    (dict(heads=[1, 1]), ValueError, r"heads lists a head twice"),
    (dict(heads=[-1]), ValueError, r"heads holds head indices"),
    (dict(tokens=[1.5]), TypeError, r"tokens holds text key indices \(ints >= 0\) or prompt words"),
    (dict(tokens=[-2]), ValueError, r"tokens holds text key indices"),
    (dict(tokens=[" "]), ValueError, r"tokens holds prompt words or key indices; got the empty word"),
    (dict(tokens=list(range(129))), ValueError, r"tokens holds 129 entries; .* at most 128"),
    (dict(tokens={"cat": 1}), TypeError, r"tokens must be"),
    (dict(relations="image -> text"), ValueError, r"relations entries look like 'image->text'"),
    (dict(relations="image->"), ValueError, r"relations entries look like"),
    (dict(relations=[3]), TypeError, r"relations entries are strings"),
    (dict(layers=[1]), TypeError, r"layers is 'all', a glob"),
    (dict(layers=[]), ValueError, r"layers is empty"),
    (dict(offload="meta"), ValueError, r"offload='meta' keeps no data"),
    (dict(offload="gpu"), ValueError, r"offload='gpu' is not a device"),
    (dict(offload="mps"), ValueError, r"offload='mps': maps can go to 'cpu' or a CUDA device"),
    (dict(offload=0), TypeError, r"offload must be a device"),
    (dict(max_bytes="1G"), TypeError, r"max_bytes must be a positive number of bytes"),
    (dict(max_bytes=0), ValueError, r"max_bytes must be a positive"),
    (dict(spill_dir=3), TypeError, r"spill_dir must be a folder path"),
    (dict(backend="cuda"), ValueError, r"backend must be one of"),
    (dict(workspace_bytes="64MiB"), TypeError, r"workspace_bytes must be a number of bytes"),
    (dict(workspace_bytes=1.5e6), TypeError, r"workspace_bytes must be a number of bytes"),
    (dict(workspace_bytes=0), ValueError, r"workspace_bytes must be positive"),
    (dict(layout=[("part0", 0)]), ValueError, r"layout: segment 'part0' needs a positive int length"),
]


@pytest.mark.parametrize("kwargs, exc, words", BAD_OPTIONS, ids=lambda x: str(x)[:40] if isinstance(x, dict) else "")
def test_bad_option_is_refused_before_anything_runs(kwargs, exc, words):
    model = Joint()
    with pytest.raises(exc, match=words):
        with attncap.capture(model, **kwargs):
            model(torch.randn(1, 6, 8))
    assert untouched(model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_offload_cuda_without_cuda_names_the_argument():
    model = Joint()
    with pytest.raises(ValueError, match=r"offload='cuda' but CUDA is not available here; use 'cpu', or None"):
        attncap.capture(model, offload="cuda")
    with pytest.raises(ValueError, match=r"offload='cuda:1'"):
        attncap.Store(offload="cuda:1")
    assert untouched(model)


def test_forgiving_forms_mean_what_they_say():
    """A single stat name, step index, head index or relation is a one-item list."""
    model = Joint()
    with attncap.capture(model, stats="entropy", steps=1, heads=1, relations="tokens->tokens") as store:
        model(torch.randn(1, 6, 8))
        model(torch.randn(1, 6, 8))
    assert sorted((r.kind, r.step, r.heads) for r in store) == [("entropy", 1, (1,)), ("map", 1, (1,))]


# ----------------------------------------------------------------------------------- at the first call
def _counting_attention(pipe):
    """Counts the calls of every attention module of the pipeline's UNet (none may run before the error)."""
    ran = []
    for m in pipe.unet.modules():
        if hasattr(m, "set_processor"):
            m.register_forward_pre_hook(lambda *a: ran.append(1))
    return ran


@pytest.fixture(scope="module")
def sd():
    from tiny_pipelines import sd_inputs, tiny_sd

    return tiny_sd(), sd_inputs


@pytest.mark.parametrize("kwargs, words", [
    (dict(steps=[10]), r"steps=\[10\]: this run has 2 denoising steps \(0 to 1\), so \[10\] would capture nothing"),
    (dict(steps=[0, 99]), r"steps=\[0, 99\]: this run has 2 denoising steps"),
    (dict(tokens=[50]), r"tokens=\[50\] selects key index 50, but the 'text' segment of image->text has 7 tokens"),
    (dict(tokens=[3, 50]), r"tokens=\[3, 50\] selects key index 50"),
    (dict(heads=[7], layers="*attn2"), r"heads"),
])
def test_request_past_the_model_fails_at_the_first_denoiser_call(sd, kwargs, words):
    pipe, inputs = sd
    ran = _counting_attention(pipe)
    try:
        with pytest.raises(ValueError, match=words):
            with attncap.capture(pipe, **kwargs):
                pipe(**inputs(steps=2, text_len=7))
        assert ran == [], "an attention layer ran before the error"
    finally:
        for m in pipe.unet.modules():
            m._forward_pre_hooks.clear()


def test_heads_and_tokens_past_a_generic_model_are_named():
    model = Joint()
    with pytest.raises(ValueError, match=r"heads=\[5\] but layer 'root' has 2 heads \(0 to 1\)"):
        with attncap.capture(model, heads=[5]):
            model(torch.randn(1, 6, 8))
    with pytest.raises(ValueError, match=r"tokens=\[2, 6\] selects key index 6, but the 'tokens' segment .* has 6"):
        with attncap.capture(model, tokens=[2, 6]):
            model(torch.randn(1, 6, 8))


# ----------------------------------------------------------------------------------- entering, nesting, threads
def test_a_capture_object_is_entered_once():
    model = Joint()
    cap = attncap.capture(model)
    with cap:
        with pytest.raises(RuntimeError, match=r"was already entered and is still open; call attncap.capture"):
            cap.__enter__()
        model(torch.randn(1, 6, 8))
    with pytest.raises(RuntimeError, match=r"was already entered; call attncap.capture\(\.\.\.\) again"):
        with cap:
            pass
    assert model._forward_pre_hooks == {} and model.calls == 1


def test_nested_capture_on_the_same_model_is_refused_and_the_outer_one_keeps_working():
    model = Joint()
    with attncap.capture(model) as outer:
        with pytest.raises(RuntimeError, match=r"already being captured by the attncap.capture block entered at "
                                               r".*test_options.py:\d+ \(still open: capture blocks on one model"):
            with attncap.capture(model, relations="all"):
                pass
        model(torch.randn(1, 6, 8))
    assert len(outer) == 1 and untouched(Joint())
    with attncap.capture(model) as again:  # released on exit
        model(torch.randn(1, 6, 8))
    assert len(again) == 1


def test_a_pipeline_and_its_own_denoiser_overlap(sd):
    pipe, _ = sd
    with attncap.capture(pipe):
        with pytest.raises(RuntimeError, match="already being captured"):
            attncap.capture(pipe.unet, layout=[("image", 4)]).__enter__()


def test_two_threads_on_one_model():
    model = Joint()
    errors, started, release = [], threading.Event(), threading.Event()

    def other_block():
        try:
            with attncap.capture(model):
                pass
        except RuntimeError as e:
            errors.append(str(e))

    def other_call():
        try:
            model(torch.randn(1, 6, 8))
        except RuntimeError as e:
            errors.append(str(e))

    with attncap.capture(model) as store:
        model(torch.randn(1, 6, 8))
        for target in (other_block, other_call):
            t = threading.Thread(target=target, name=f"worker-{target.__name__}")
            t.start()
            t.join()
        model(torch.randn(1, 6, 8))
    assert "in thread 'MainThread', while thread 'worker-other_block' asks for a second capture" in errors[0]
    assert "a model call from thread 'worker-other_call' reached an attncap.capture block that follows thread " \
           "'MainThread'" in errors[1]
    assert [r.step for r in store] == [0, 1]  # the refused call left no record and no step


def test_a_capture_may_follow_a_pipeline_run_in_another_thread(sd):
    """A pipeline (or generate()) run in a worker thread, as streamers do, is captured: its thread is followed.
    A plain module's SDPA is intercepted on the entering thread only, so there a worker's call is an error."""
    pipe, inputs = sd
    with attncap.capture(pipe, layers="*attn2") as store:
        t = threading.Thread(target=pipe, kwargs=inputs(steps=2))
        t.start()
        t.join()
    assert sorted({r.step for r in store}) == [0, 1]
    model, errors = Joint(), []

    def run():
        try:
            model(torch.randn(1, 6, 8))
        except RuntimeError as e:
            errors.append(str(e))

    with attncap.capture(model):
        t = threading.Thread(target=run, name="worker")
        t.start()
        t.join()
    assert len(errors) == 1 and "from thread 'worker'" in errors[0]
