"""attncap.capture on a tiny random-weight Stable Diffusion pipeline (CPU, prompt_embeds passed in).

The maps are checked against an explicit softmax of the very q and k that reach SDPA, recorded
in a separate run with the same seed; everything else checks that capture leaves the pipeline
as it found it.
"""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import attncap
from attncap.intercept import intercept_sdpa
from tiny_pipelines import sd_inputs, tiny_sd

CROSS = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2"
SELF = "unet.up_blocks.1.attentions.1.transformer_blocks.0.attn1"


@pytest.fixture(scope="module")
def pipe():
    return tiny_sd()


def record_qk(pipe, inputs) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """(layer, step) -> (q, k) exactly as they reach SDPA, from a plain run (no attncap)."""
    seen: dict = {}
    current = {"layer": None, "step": -1}
    hooks = [pipe.unet.register_forward_pre_hook(lambda m, a: current.update(step=current["step"] + 1))]
    for name, module in pipe.unet.named_modules():
        if hasattr(module, "processor"):
            hooks.append(module.register_forward_pre_hook(lambda m, a, n=f"unet.{name}": current.update(layer=n)))

    def handler(q, k, v, *args, **kwargs):
        seen[(current["layer"], current["step"])] = (q.detach().clone(), k.detach().clone())
        return None

    try:
        with intercept_sdpa(handler):
            pipe(**inputs)
    finally:
        for h in hooks:
            h.remove()
    return seen


def explicit_probs(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    s = q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5
    return s.softmax(-1)


def test_maps_equal_explicit_softmax_of_the_same_q_and_k(pipe):
    qk = record_qk(pipe, sd_inputs(steps=2))
    with attncap.capture(pipe, relations=["image->text", "image->image"], layers=[CROSS, SELF], pool=2,
                         stats=("entropy",)) as store:
        pipe(**sd_inputs(steps=2))  # fresh inputs: same seed, same noise
    for step in (0, 1):
        q, k = qk[(CROSS, step)]
        probs = explicit_probs(q, k).mean(1)  # [2B, Nq, Nk] head mean; rows 0 uncond, 1 cond
        for branch, half in (("uncond", 0), ("cond", 1)):
            (rec,) = store.get(layer=CROSS, step=step, relation="image->text", kind="map", branch=branch)
            # down_blocks.1 sees the 20x28 latent at half resolution, 10x14 tokens; pool=2 -> 5x7
            assert rec.data.shape == (1, 1, 5 * 7, 7) and rec.query_grid == (5, 7) and rec.key_grid is None
            expected = probs[half].reshape(10, 14, 7)
            torch.testing.assert_close(rec.data[0, 0].double(), _pooled(expected, 2).reshape(-1, 7),
                                       atol=1e-5, rtol=1e-4)
        q, k = qk[(SELF, step)]
        per_head = explicit_probs(q, k)
        probs = per_head.mean(1)
        (rec,) = store.get(layer=SELF, step=step, relation="image->image", kind="map", branch="cond")
        full = probs[1].reshape(20, 28, 20, 28)
        pooled = _pooled(_pooled(full, 2).permute(2, 3, 0, 1), 2).permute(2, 3, 0, 1)
        assert rec.query_grid == (10, 14) and rec.key_grid == (10, 14)
        torch.testing.assert_close(rec.data[0, 0].double(), pooled.reshape(140, 140), atol=1e-6, rtol=1e-4)
        (ent,) = store.get(layer=SELF, step=step, relation="image->image", kind="entropy", branch="cond")
        h = -(per_head[1] * per_head[1].clamp_min(1e-300).log()).sum(-1).mean(0).reshape(20, 28, 1)
        torch.testing.assert_close(ent.data[0, 0].double(), _pooled(h, 2).reshape(-1), atol=1e-5, rtol=1e-4)


def _pooled(x: torch.Tensor, f: int) -> torch.Tensor:
    """Mean over f x f blocks of the first two axes of x [h, w, ...] (sizes divisible here)."""
    h, w = x.shape[:2]
    return x.reshape(h // f, f, w // f, f, *x.shape[2:]).mean(dim=(1, 3))


def test_capture_does_not_change_the_image_and_restores_processors(pipe):
    before = {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "processor")}
    plain = pipe(**sd_inputs()).images
    with attncap.capture(pipe, relations="all", stats=("entropy", "colsum")) as store:
        captured = pipe(**sd_inputs()).images
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)
    after = {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "processor")}
    assert all(after[n] is before[n] for n in before)
    assert {r.step for r in store.records} == {0, 1}
    assert {r.relation for r in store.records} == {"image->text", "image->image"}


def test_layers_not_selected_are_untouched(pipe):
    with attncap.capture(pipe, layers="*down_blocks.0*attn2") as store:
        untouched = pipe.unet.up_blocks[0].attentions[0].transformer_blocks[0].attn2.processor
        wrapped = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.processor
        assert type(untouched).__name__ == "AttnProcessor2_0"
        assert type(wrapped).__name__ == "CaptureAttnProcessor2_0"
        pipe(**sd_inputs(steps=1))
    assert {r.layer for r in store.records} == {"unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2"}


def test_steps_last_and_tokens(pipe):
    with attncap.capture(pipe, steps="last", tokens=[1, 3]) as store:
        pipe(**sd_inputs(steps=3))
    assert {r.step for r in store.records} == {2}
    rec = store.get(kind="tokens", branch="cond")[0]
    assert rec.meta["keys"] == [1, 3] and rec.data.shape[-1] == 2


def test_exception_inside_the_pipeline_restores_everything(pipe):
    before = {n: m.processor for n, m in pipe.unet.named_modules() if hasattr(m, "processor")}
    hooks_before = dict(pipe.unet._forward_pre_hooks)
    with pytest.raises(RuntimeError, match="boom"):
        with attncap.capture(pipe) as store:
            pipe(**sd_inputs(steps=1))
            raise RuntimeError("boom")
    assert len(store.records) > 0  # what was captured before the failure is kept
    assert all(m.processor is before[n] for n, m in pipe.unet.named_modules() if hasattr(m, "processor"))
    assert dict(pipe.unet._forward_pre_hooks) == hooks_before


def test_over_budget_fails_before_the_first_step(pipe):
    steps_run = []
    hook = pipe.unet.register_forward_hook(lambda *a: steps_run.append(1))
    try:
        with pytest.raises(ValueError, match=r"max_bytes.*pool=4"):
            with attncap.capture(pipe, relations="image->image", heads="all", max_bytes=64 * 2**10):
                pipe(**sd_inputs(steps=2))
    finally:
        hook.remove()
    assert steps_run == []  # refused before the denoiser ran once
    assert all(type(m.processor).__name__ == "AttnProcessor2_0" for m in pipe.unet.modules() if hasattr(m, "processor"))


def test_bad_options_fail_before_installing(pipe):
    with pytest.raises(ValueError, match="relations entries look like"):
        with attncap.capture(pipe, relations="image-text"):
            pass
    with pytest.raises(ValueError, match="selects no attention layer"):
        with attncap.capture(pipe, layers="*nothing*"):
            pass
    with pytest.raises(TypeError, match="does not know how to capture"):
        with attncap.capture(object()):
            pass


def test_spill_dir_of_a_killed_run_loads(tmp_path: Path):
    """Kill a capture midway (SIGKILL from inside step 1): everything spilled before it loads."""
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        import attncap
        from tiny_pipelines import sd_inputs, tiny_sd
        pipe = tiny_sd()
        calls = []
        def killer(m, a):
            calls.append(1)
            if len(calls) == 2:
                os.kill(os.getpid(), signal.SIGKILL)
        pipe.unet.register_forward_pre_hook(killer)
        with attncap.capture(pipe, layers="*attn2", spill_dir={str(tmp_path)!r}):
            pipe(**sd_inputs(steps=3))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=300)
    assert result.returncode == -9, result.stderr.decode()[-2000:]  # it was killed
    store = attncap.load(tmp_path)
    assert len(store.records) == 7 * 2  # step 0 only: seven cross-attention layers x two CFG halves
    assert {r.step for r in store.records} == {0}
    assert all(r.data.shape[-1] == 7 for r in store.records)


def test_sdxl_non_square_grid_and_unchanged_image():
    from tiny_pipelines import sdxl_inputs, tiny_sdxl

    pipe = tiny_sdxl()
    plain = pipe(**sdxl_inputs()).images
    with attncap.capture(pipe, relations=["image->text", "image->image"], pool=2, stats=("colsum",)) as store:
        captured = pipe(**sdxl_inputs()).images
    torch.testing.assert_close(captured, plain, atol=1e-5, rtol=1e-5)
    cross = store.get(layer="*attn2", relation="image->text", kind="map", branch="cond", step=1)
    assert len(cross) == 8  # two transformer blocks each in down_blocks.1, mid_block, and 2x in up_blocks.0
    # 48x32 image -> 24x16 latent -> 12x8 tokens in the attention blocks -> pool 2 -> 6x4
    assert all(r.query_grid == (6, 4) and r.data.shape == (1, 1, 24, 9) for r in cross)
    # Each query's probabilities over the 9 text tokens sum to 1: normalised over all keys of the call.
    torch.testing.assert_close(cross[0].data.sum(-1), torch.ones(1, 1, 24), atol=1e-5, rtol=0)
    colsum = store.get(layer="*attn1", relation="image->image", kind="colsum", branch="cond", step=0)[0]
    # 96 queries each give mass 1; averaging over 4-token key bins leaves 96 / 4 in total.
    assert colsum.data.shape == (1, 1, 24) and abs(colsum.data.sum().item() - 24) < 1e-3
