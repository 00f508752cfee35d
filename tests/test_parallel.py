"""Capture under diffusers' context parallelism equals capture on one process.

pytest spawns 2 and 4 local gloo ranks (127.0.0.1, a free port, one thread each, bounded in time).
Each rank builds the same tiny Wan 2.1 or Flux transformer (seeded), captures one cond and one uncond call
in a single process as the reference, then enables Ulysses, ring or unified CP on a fresh copy and
captures the same calls. Rank 0's records must equal the reference (same keys, data within 1e-5
in fp32) and the parallel output must be unchanged by capture. The video grid (2, 4, 4) is split
into 8- or 16-token shards, so the (1, 3, 3) pooled bins straddle shards.

On a CPU machine torch.accelerator.device_count() is 0 and diffusers' _resolve_parallel_config
divides by it: the ranks patch it to 1 (each rank's "device" is the CPU).
"""
from __future__ import annotations

import json
import os
import socket
import traceback
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

TEXT = 8
GRID = (2, 4, 4)


def _model(heads: int, seed: int = 0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=8,
                                 in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=16, num_layers=2,
                                 cross_attn_norm=True, qk_norm="rms_norm_across_heads", rope_max_seq_len=32).eval()


def _flux(heads: int, seed: int = 0):
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=8, num_attention_heads=heads, joint_attention_dim=32,
                                  pooled_projection_dim=24, guidance_embeds=False, axes_dims_rope=(2, 2, 4)).eval()


FLUX_GRID = (4, 6)


def _calls(family: str):
    """The denoiser calls of one step: a cond call, then an uncond call (Wan and Flux true CFG)."""
    g = torch.Generator().manual_seed(1)
    if family == "wan":
        x = torch.randn(1, 4, GRID[0], GRID[1] * 2, GRID[2] * 2, generator=g)
        texts = torch.randn(1, TEXT, 16, generator=g), torch.randn(1, TEXT, 16, generator=g)
        return [lambda m, c=c: m(x, torch.tensor([600.0]), c, return_dict=False)[0] for c in texts]
    h, w = FLUX_GRID
    x = torch.randn(1, h * w, 16, generator=g)
    axes = torch.meshgrid(torch.zeros(1), torch.arange(float(h)), torch.arange(float(w)), indexing="ij")
    img_ids = torch.stack(axes, -1).reshape(-1, 3)
    texts = [(torch.randn(1, TEXT, 32, generator=g), torch.randn(1, 24, generator=g)) for _ in range(2)]
    return [lambda m, c=c: m(hidden_states=x, encoder_hidden_states=c[0], pooled_projections=c[1],
                             timestep=torch.tensor([0.6]), img_ids=img_ids, txt_ids=torch.zeros(TEXT, 3),
                             return_dict=False)[0] for c in texts]


def _wan22(heads: int, seed: int = 0):
    """A tiny Wan 2.2 pipeline: transformer for the high-noise step, transformer_2 for the low-noise one."""
    from tiny_transformers import tiny_wan

    return tiny_wan(seed=seed, two=True)


def _pipe_call(pipe):
    from tiny_transformers import wan_inputs

    # 64 x 80 pixels: a 3 x 4 x 5 video token grid, which 2 ranks split evenly
    return pipe(**{**wan_inputs(height=64, width=80, steps=2), "output_type": "latent"}).frames


def _enable(model, config) -> None:
    for m in ([model.transformer, model.transformer_2] if hasattr(model, "transformer_2") else [model]):
        m.enable_parallelism(config=config)


def _run(model, family: str, options: dict, parallel=None):
    """Capture the calls of one step; (records by key, outputs). parallel: a ContextParallelConfig to
    enable inside the block (capture first, enable_parallelism second)."""
    import attncap

    with attncap.capture(model, **options) as store, torch.no_grad():
        if parallel is not None:
            _enable(model, parallel)
        outs = [_pipe_call(model)] if family == "wan22" else [call(model) for call in _calls(family)]
    records = {(r.layer, r.step, r.branch, r.relation, r.kind): r.data for r in store.records}
    return records, outs


CHECKS = [  # capture options checked under every CP layout
    dict(relations="all", pool=(1, 3, 3), stats=("colsum", "entropy")),
    dict(relations="all", heads="all", stats=("peak",)),
    dict(relations="video->text", heads=[1], tokens=[0, 5]),
]


def _worker(rank: int, world: int, port: int, layouts: list, out_dir: str) -> None:
    torch.set_num_threads(1)
    result = {"rank": rank, "ok": [], "error": None}
    try:
        import torch.distributed as dist
        from diffusers import ContextParallelConfig

        torch.accelerator.device_count = lambda: 1   # see the module docstring
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
        references = {}
        for name, family, ulysses, ring, heads, anything in layouts:
            build = {"wan": _model, "flux": _flux, "wan22": _wan22}[family]
            checks = CHECKS if family == "wan" else CHECKS[:1]
            for i, options in enumerate(checks):
                if (family, heads, i) not in references:
                    references[family, heads, i] = _run(build(heads), family, options)
                reference, ref_outs = references[family, heads, i]
                model = build(heads)
                config = ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring, ulysses_anything=anything)
                if i == 1:  # capture first, enable_parallelism inside the block: the order does not matter
                    records, outs = _run(model, family, options, parallel=config)
                else:
                    _enable(model, config)
                    if ring == 1 and family != "wan22":  # diffusers' ring needs an LSE (none on CPU natively)
                        with torch.no_grad():
                            plain = _calls(family)[0](model)
                        torch.testing.assert_close(ref_outs[0], plain, atol=1e-5, rtol=1e-5)
                    records, outs = _run(model, family, options)
                for out, ref in zip(outs, ref_outs):
                    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
                if rank == 0:
                    assert sorted(records) == sorted(reference), (name, sorted(set(records) ^ set(reference))[:4])
                    for key, data in records.items():
                        torch.testing.assert_close(data, reference[key], atol=1e-5, rtol=1e-5,
                                                   msg=lambda m, key=key: f"{name} {key}: {m}")
                else:
                    assert not records, "ranks other than 0 keep no records by default"
                result["ok"].append(f"{name} {options}")
        dist.destroy_process_group()
    except Exception:
        result["error"] = traceback.format_exc()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world: int, layouts: list, tmp_path: Path, timeout: float = 240.0) -> None:
    context = mp.start_processes(_worker, args=(world, _free_port(), layouts, str(tmp_path)), nprocs=world,
                                 join=False, start_method="spawn")
    for _ in range(int(timeout)):
        if context.join(timeout=1):
            break
    else:
        for p in context.processes:
            p.kill()
        pytest.fail(f"{world} ranks did not finish within {timeout:.0f} s")
    for rank in range(world):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["error"] is None, f"rank {rank}:\n{result['error']}"
        assert len(result["ok"]) == sum(len(CHECKS) if layout[1] == "wan" else 1 for layout in layouts)


def test_two_ranks_ulysses_ring_and_heads_not_divisible(tmp_path):
    # (name, ulysses degree, ring degree, heads, ulysses_anything): 3 heads do not divide over 2 Ulysses
    # ranks, which diffusers runs with ulysses_anything=True
    _spawn(2, [("ulysses", "wan", 2, 1, 2, False), ("ring", "wan", 1, 2, 2, False),
               ("ulysses, 3 heads", "wan", 2, 1, 3, True), ("flux ulysses", "flux", 2, 1, 2, False),
               ("flux ring", "flux", 1, 2, 2, False), ("wan 2.2 pipeline, ulysses", "wan22", 2, 1, 2, False)],
           tmp_path)


def test_four_ranks_unified_and_ring(tmp_path):
    _spawn(4, [("unified 2x2", "wan", 2, 2, 2, False), ("ring 4", "wan", 1, 4, 2, False)], tmp_path)


def test_an_xdit_processor_is_refused_with_the_alternative():
    """xfuser cannot be imported without an accelerator; a processor class from an "xfuser" module stands in."""
    import attncap

    model = _model(2)
    proc_class = type("xFuserWanAttnProcessor", (), {"__module__": "xfuser.model_executor.layers.attention_processor",
                                                     "__call__": lambda self, attn, *a, **k: None})
    model.blocks[0].attn1.processor = proc_class()
    with pytest.raises(ValueError, match="enable_parallelism"):
        with attncap.capture(model):
            pass
