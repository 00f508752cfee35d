"""attncap.explain: word maps of pictures the model did not generate.

The demo model grounds its words on rendered scenes it never saw (an IoU floor, a control ceiling);
tiny random-weight SD, SDXL, SD3, Flux and Wan pipelines, given tiny text encoders over the demo
model's word tokenizer so that the prompt really goes through each pipeline's encode_prompt, check the
wiring: the denoiser's input equals the scheduler's own noising of the VAE latent, the records sit on
the input's token grid, the captured maps equal an explicit softmax of the same call, the input is left
untouched, and bad inputs fail before any work.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

import attncap
from attncap.demo_model import load_pipeline, make_scene
from attncap.demo_model.grounding import binarise, iou
from attncap.demo_model.scenes import HELDOUT_SEED
from attncap.explain import DEFAULT_NOISE_LEVELS, DEFAULT_SEEDS, inputs
from tiny_text_encoders import tiny_flux, tiny_sd, tiny_sd3, tiny_sdxl, tiny_wan

pytest.importorskip("diffusers")
pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "a red circle and a blue square"
TEST_SCENES = HELDOUT_SEED + 2000  # neither training, the grounding benchmark nor benchmarks/explain.py use these


def _denoiser_inputs(model):
    """A list that fills with (args, kwargs) of every call of ``model``; remove the hook with .handle.remove()."""
    seen = []

    def hook(module, args, kwargs):
        seen.append((args, kwargs))

    seen_handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    return seen, seen_handle


def _image(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((h, w, 3), dtype=np.float32)


# ------------------------------------------------------------------ the demo model: grounding on unseen scenes
@pytest.fixture(scope="module")
def shapes():
    return load_pipeline()


def test_demo_scenes_ground_their_words(shapes):
    """Default settings on 8 scenes no selection saw: each word's Otsu mask covers its object, not another.
    Measured here: mean IoU 0.864 (lowest word 0.67), control 0.000 (benchmarks/explain.py: 0.861 on 48
    other scenes); a floor of 0.75 holds the issue's 0.7 target with room for another CPU's rounding."""
    ious, controls = [], []
    for seed in range(TEST_SCENES, TEST_SCENES + 8):
        scene = make_scene(seed)
        store = attncap.explain(shapes, scene.image, scene.caption)
        assert {r.branch for r in store.records} == {"cond"}
        assert len({r.step for r in store.records}) == len(DEFAULT_NOISE_LEVELS) * len(DEFAULT_SEEDS)
        for k, obj in enumerate(scene.objects):
            other = scene.objects[(k + 1) % len(scene.objects)]
            for word in (obj.colour, obj.shape):
                pred = binarise(store.token_map(word, size=(32, 32)).numpy())
                ious.append(iou(pred, obj.mask))
                controls.append(iou(pred, other.mask))
    assert np.mean(ious) >= 0.75, ious
    assert np.mean(controls) <= 0.05, controls


def test_demo_input_forms_agree_and_stay_untouched(shapes):
    """PIL, uint8 and float HWC / CHW arrays, a torch tensor and a one-frame list give the same maps;
    the inputs are not modified; maps_at='input' returns maps at a 40x24 input's size."""
    import PIL.Image

    scene = make_scene(TEST_SCENES + 100)
    u8 = (scene.image * 255).round().astype(np.uint8)
    f32 = u8.astype(np.float32) / 255
    chw = torch.from_numpy(f32.transpose(2, 0, 1).copy())
    before = chw.clone()
    forms = [PIL.Image.fromarray(u8), u8, f32, chw, [f32]]
    maps = [attncap.explain(shapes, x, scene.caption, noise_levels=0.4).token_map(scene.objects[0].colour, size=(32, 32))
            for x in forms]
    for m in maps[1:]:
        torch.testing.assert_close(m, maps[0], rtol=0, atol=1e-5)
    assert torch.equal(chw, before) and np.array_equal(f32, u8.astype(np.float32) / 255)

    tall = inputs.resample(torch.from_numpy(f32).permute(2, 0, 1)[None], 1, (40, 24))[0].permute(1, 2, 0).numpy()
    store = attncap.explain(shapes, tall, scene.caption, noise_levels=0.4, maps_at="input")
    assert store.token_map(scene.objects[0].colour).shape == (40, 24)
    meta = store.records[0].meta["explain"]
    assert meta["input_size"] == [40, 24] and meta["model_size"][0] % 8 == 0 and meta["model_size"][1] % 8 == 0


@pytest.mark.parametrize("bad, error", [
    (np.zeros((32, 32, 4), np.float32), "3 colour channels"),
    (np.full((32, 32, 3), 1.5, np.float32), r"\[0, 1\]"),
    (np.full((32, 32, 3), np.nan, np.float32), "NaN"),
    (np.zeros((5, 32, 32, 3), np.float32), "video of 5 frames"),
    ([np.zeros((32, 32, 3)), np.zeros((16, 16, 3))], "one size"),
    ("photo.png", "PIL image"),
], ids=["rgba", "range", "nan", "video-for-image", "ragged-frames", "path"])
def test_bad_inputs_fail_before_any_work(shapes, bad, error):
    seen, handle = _denoiser_inputs(shapes.unet)
    try:
        with pytest.raises((ValueError, TypeError), match=error):
            attncap.explain(shapes, bad, PROMPT)
        with pytest.raises(ValueError, match="noise_levels"):
            attncap.explain(shapes, np.zeros((32, 32, 3)), PROMPT, noise_levels=(0.5, 1.5))
        with pytest.raises(ValueError, match="steps"):
            attncap.explain(shapes, np.zeros((32, 32, 3)), PROMPT, steps="last")
    finally:
        handle.remove()
    assert not seen


# ------------------------------------------------------------------ SD: latents, noising, exact maps
def test_sd_noising_grid_and_exact_maps():
    """Tiny SD (VAE x2, DDIM): the UNet's input is scheduler.add_noise(VAE mean * scaling, seed noise, t);
    a 16x24 input gives 8x12 query grids; each image->text map equals softmax(q k^T * scale) of that call."""
    pipe = tiny_sd()
    image = _image(16, 24)
    seen, handle = _denoiser_inputs(pipe.unet)
    qk: dict[str, list] = {}
    hooks = []
    for name, mod in pipe.unet.named_modules():
        if name.endswith("attn2"):
            for part in ("to_q", "to_k"):
                hooks.append(getattr(mod, part).register_forward_hook(
                    lambda m, a, out, key=(name, part): qk.setdefault(key, []).append(out.detach())))
    try:
        store = attncap.explain(pipe, image, PROMPT, noise_levels=(0.25, 0.75), seeds=(3, 4), size=(16, 24))
    finally:
        handle.remove()
        for h in hooks:
            h.remove()
    assert len(seen) == 4 and sorted({r.step for r in store.records}) == [0, 1, 2, 3]

    pixels = torch.from_numpy(image).permute(2, 0, 1)[None] * 2 - 1
    x0 = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    for call, (level, seed) in enumerate([(0.25, 3), (0.25, 4), (0.75, 3), (0.75, 4)]):
        args, kwargs = seen[call]
        t = round(level * 999)
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
        expected = pipe.scheduler.add_noise(x0, noise, torch.tensor([t]))
        torch.testing.assert_close(args[0], expected, rtol=0, atol=1e-6)
        assert int(args[1][0]) == t
    assert {r.query_grid for r in store.records} == {(8, 12), (4, 6)}

    heads = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.heads
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    for call in range(4):
        q, k = (qk[(layer, p)][call].double() for p in ("to_q", "to_k"))
        q = q.unflatten(-1, (heads, -1)).transpose(1, 2)
        k = k.unflatten(-1, (heads, -1)).transpose(1, 2)
        p = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1).mean(1, keepdim=True)
        (rec,) = store.get(layer="unet." + layer, step=call)
        torch.testing.assert_close(rec.data.double(), p, rtol=1e-4, atol=1e-6)  # fp32 kernel vs fp64
    assert store.records[0].meta["explain"]["noise_level"] == 0.25
    assert store.token_map("circle", size=(8, 12)).shape == (8, 12)
    assert attncap.explain(pipe, image, PROMPT, noise_levels=0.5, maps_at="input").token_map("red").shape == (16, 24)


def test_sd_cfg_runs_the_negative_prompt():
    pipe = tiny_sd()
    store = attncap.explain(pipe, _image(16, 16), PROMPT, noise_levels=(0.5,), cfg=True, negative_prompt="a green")
    assert {(r.step, r.branch) for r in store.records} == {(0, "cond"), (1, "uncond")}
    cond, uncond = (store.aggregate(branch=b, size=(8, 8)) for b in ("cond", "uncond"))
    assert not torch.allclose(cond, uncond)


def test_sdxl_euler_input_is_the_schedulers():
    """SDXL's Euler scheduler noises x0 + sigma * noise and scales by 1 / sqrt(sigma^2 + 1): the same UNet input."""
    from diffusers import EulerDiscreteScheduler

    pipe = tiny_sdxl()
    image = _image(32, 16)
    seen, handle = _denoiser_inputs(pipe.unet)
    try:
        store = attncap.explain(pipe, image, PROMPT, noise_levels=0.6, size=(32, 16))
    finally:
        handle.remove()
    t = round(0.6 * 999)
    euler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    euler.set_timesteps(timesteps=[t])
    x0 = pipe.vae.encode(torch.from_numpy(image).permute(2, 0, 1)[None] * 2 - 1).latent_dist.mean
    x0 = x0 * pipe.vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    expected = euler.scale_model_input(euler.add_noise(x0, noise, torch.tensor([float(t)])), float(t))
    torch.testing.assert_close(seen[0][0][0], expected, rtol=1e-5, atol=1e-5)
    assert seen[0][1]["added_cond_kwargs"]["time_ids"].tolist() == [[32, 16, 0, 0, 32, 16]]
    assert {r.query_grid for r in store.records} == {(8, 4)}
    assert store.token_map("blue").shape == (8, 4)


# ------------------------------------------------------------------ flow matching: SD3, Flux
def _flow_expected(pipe, image, level, seed):
    """scale_noise of an unshifted FlowMatchEulerDiscreteScheduler at sigma = level, on (mode - shift) * scaling."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    vae = pipe.vae
    x0 = (vae.encode(torch.from_numpy(image).permute(2, 0, 1)[None] * 2 - 1).latent_dist.mode()
          - vae.config.shift_factor) * vae.config.scaling_factor
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    sched = FlowMatchEulerDiscreteScheduler.from_config(pipe.scheduler.config, shift=1.0, use_dynamic_shifting=False)
    sched.set_timesteps(sigmas=[level])
    return sched.scale_noise(x0, torch.tensor([level * 1000.0]), noise)


def test_sd3_flow_noising_and_joint_grid():
    pipe = tiny_sd3()
    image = _image(32, 48, seed=1)
    seen, handle = _denoiser_inputs(pipe.transformer)
    try:
        store = attncap.explain(pipe, image, PROMPT, noise_levels=(0.4,), seeds=(5,), size=(32, 48),
                                max_sequence_length=32)
    finally:
        handle.remove()
    kwargs = seen[0][1]
    # the scheduler's sigma comes back from timesteps / 1000 in float32: a few ulps of the latent
    torch.testing.assert_close(kwargs["hidden_states"], _flow_expected(pipe, image, 0.4, 5), rtol=1e-6, atol=2e-6)
    assert float(kwargs["timestep"][0]) == pytest.approx(400.0)
    assert kwargs["encoder_hidden_states"].shape[1] == 16 + 32   # CLIP (model_max_length 16) then T5 (32)
    assert {r.relation for r in store.records} == {"image->text"} and {r.query_grid for r in store.records} == {(8, 12)}
    assert store.token_map("square").shape == (8, 12)


def test_flux_packed_flow_input():
    pipe = tiny_flux()
    image = _image(32, 48, seed=2)
    seen, handle = _denoiser_inputs(pipe.transformer)
    try:
        store = attncap.explain(pipe, image, PROMPT, noise_levels=(0.7,), size=(32, 48), max_sequence_length=32)
    finally:
        handle.remove()
    kwargs = seen[0][1]
    expected = _flow_expected(pipe, image, 0.7, 0)
    packed = pipe._pack_latents(expected, *expected.shape)
    torch.testing.assert_close(kwargs["hidden_states"], packed, rtol=1e-6, atol=2e-6)
    assert float(kwargs["timestep"][0]) == pytest.approx(0.7)
    assert {r.query_grid for r in store.records} == {(8, 12)}
    assert store.token_map("red").shape == (8, 12)


# ------------------------------------------------------------------ video: Wan 2.1 / 2.2
def test_wan_video_frames_grid_and_experts():
    """11 frames of 48x80 -> 9 frames (4k + 1, picked evenly) -> latent 3x6x10 -> tokens 3x3x5. Wan 2.2
    (boundary 0.9): level 0.95 runs transformer, 0.5 transformer_2, whose records keep its name."""
    pipe = tiny_wan(two=True)
    frames = [_image(48, 80, seed=i) for i in range(11)]
    video = np.stack(frames)
    before = video.copy()
    seen1, h1 = _denoiser_inputs(pipe.transformer)
    seen2, h2 = _denoiser_inputs(pipe.transformer_2)
    try:
        store = attncap.explain(pipe, video, PROMPT, noise_levels=(0.95, 0.5), size=(48, 80), max_sequence_length=32)
    finally:
        h1.remove()
        h2.remove()
    assert np.array_equal(video, before)
    assert len(seen1) == 1 and len(seen2) == 1
    assert seen1[0][1]["hidden_states"].shape == (1, 16, 3, 6, 10)
    assert float(seen2[0][1]["timestep"][0]) == pytest.approx(500.0)
    picked = torch.from_numpy(video[np.linspace(0, 10, 9).round().astype(int)]).permute(3, 0, 1, 2)[None] * 2 - 1
    vae = pipe.vae
    shape = (1, vae.config.z_dim, 1, 1, 1)
    x0 = (vae.encode(picked).latent_dist.mode() - torch.tensor(vae.config.latents_mean).view(shape)) \
        / torch.tensor(vae.config.latents_std).view(shape)
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(seen2[0][1]["hidden_states"], 0.5 * noise + 0.5 * x0, rtol=1e-6, atol=2e-6)
    assert {r.layer.split(".")[0] for r in store.get(step=1)} == {"transformer_2"}
    assert {r.relation for r in store.records} == {"video->text"} and {r.query_grid for r in store.records} == {(3, 3, 5)}
    assert store.token_map("blue").shape == (3, 3, 5)
    assert store.records[0].meta["explain"]["model_size"] == [9, 48, 80]

    still = attncap.explain(pipe, frames[0], PROMPT, noise_levels=0.95, size=(48, 80), max_sequence_length=32,
                            tokens=["blue"], maps_at="input")
    assert still.token_map("blue").shape == (1, 48, 80)


def test_pipeline_without_text_encoder_is_refused():
    from tiny_pipelines import tiny_sd as without_encoder

    with pytest.raises(ValueError, match="has none: load it with its text encoder"):
        attncap.explain(without_encoder(), _image(16, 16), PROMPT)


def test_unknown_pipeline_is_named():
    class Nothing:
        scheduler = None

    with pytest.raises(ValueError, match="does not know how to drive a Nothing"):
        attncap.explain(Nothing(), np.zeros((8, 8, 3)), PROMPT)


def test_model_size_keeps_aspect_and_multiples():
    h, w = inputs.model_size((300, 600), (512, 512), 8)   # 362 x 724 at 512^2's area, rounded to 8
    assert (h, w) == (360, 728)
    assert inputs.model_size((32, 32), (32, 32), 8) == (32, 32)
    assert inputs.model_size((1000, 10), (64, 64), 16) == (640, 16)
    with pytest.raises(ValueError, match="multiples of 16"):
        inputs.model_size((32, 32), (64, 64), 16, size=(40, 48))
    assert inputs.valid_frame_count(11, 4) == 9 and inputs.valid_frame_count(81, 4, limit=20) == 17


# ------------------------------------------------------------------ the CLI verb and the example
def test_cli_explain_writes_maps_masks_and_explorer(tmp_path, capsys):
    import PIL.Image

    from attncap.cli import main

    scene = make_scene(TEST_SCENES + 200)
    png = tmp_path / "scene.png"
    PIL.Image.fromarray((scene.image * 255).round().astype(np.uint8)).save(png)
    out = tmp_path / "out"
    assert main(["explain", "shapes", str(png), "--prompt", scene.caption, "--out", str(out), "--quiet",
                 "--no-report", "--noise-levels", "0.1,0.2"]) == 0
    obj, other = scene.objects[0], scene.objects[1]
    for name in ("image.png", "index.json", "run.json", "explorer.html", f"words/{obj.colour}.png",
                 f"words/{obj.colour}_overlay.png", f"masks/{obj.shape}.npy"):
        assert (out / name).is_file(), name
    mask = np.load(out / "masks" / f"{obj.shape}.npy")
    assert mask.shape == (32, 32) and iou(mask, obj.mask) > iou(mask, other.mask)
    store = attncap.load(out)
    assert len({r.step for r in store.records}) == 2 and store.tokens["prompt"] == scene.caption

    assert main(["explain", "shapes", str(tmp_path / "none.png"), "--prompt", "a red", "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["explain", "shapes", str(png), "--prompt", "a red", "--out", str(out), "--quiet"]) == 2
    assert "--out" in capsys.readouterr().err  # holds a store already: never overwritten silently
    with pytest.raises(SystemExit):
        main(["explain", "shapes", str(png), "--prompt", "a red", "--out", str(out), "--noise-levels", "2"])


@pytest.mark.parametrize("argv", [[], ["--tiny", "wan"]], ids=["demo", "tiny-wan"])
def test_example_runs(tmp_path, capsys, argv):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "explain_image.py"
    spec = importlib.util.spec_from_file_location("explain_image_example", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main(argv + ["--out", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert (tmp_path / "out" / "words.png").is_file() and "saved" in printed
    if not argv:  # the demo model on a held-out scene: every word scored, and found
        scores = [float(line.split("IoU ")[1].split()[0]) for line in printed.splitlines() if "IoU" in line]
        assert len(scores) >= 4 and np.mean(scores) > 0.5
