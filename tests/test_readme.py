"""Every ```python block of README.md runs, on CPU, and gives what it says.

Each block runs in a fresh namespace holding ``attncap`` and ``torch`` (the README imports them in its
first block) and, where a block names something the reader brings, a tiny stand-in:

    block uses                              stand-in (random weights, built from configs, no download)
    StableDiffusionPipeline.from_pretrained  tiny_sd_with_text(): the 2-level UNet of tiny_pipelines with a
      (...).to("cuda")                       CLIP tokenizer over single characters and a 1-layer CLIP text
                                             encoder, so prompts and words work as with the real model;
                                             2 denoising steps by default instead of 50 (render_all draws
                                             every step of every layer)
    model, inputs (a VLM)                    tiny Qwen2-VL of test_capture_transformers, one prompt with an image
    my_dit, x, text (your own DiT)           examples' PartDiT with two 4x4x4 parts and 16 text tokens

Nothing else in a block is changed. After a block runs, every store it made must hold records of
each relation it asked for, every products dict must be non-empty, and a line ``expr  # [a, b, ...]``
whose comment gives numbers must evaluate to a tensor of that shape: a snippet that fails, returns
nothing, or returns something else than it says fails its test. Shell blocks (install, make, the CLI)
are not run here; the CLI has tests/test_cli.py.
"""
from __future__ import annotations

import ast
import json
import re
import sys
from pathlib import Path

import pytest
import torch

import attncap

pytestmark = pytest.mark.usefixtures("one_thread")

README = Path(__file__).resolve().parent.parent / "README.md"
FROM_PRETRAINED = re.compile(r"StableDiffusionPipeline\.from_pretrained\((?:[^()]|\([^()]*\))*\)\.to\(\"cuda\"\)", re.S)


def python_blocks() -> list[tuple[int, str]]:
    """(first line number, source) of each ```python block."""
    blocks, lines, start = [], README.read_text().splitlines(), None
    for i, line in enumerate(lines):
        if start is None and line.strip() == "```python":
            start = i + 1
        elif start is not None and line.strip() == "```":
            blocks.append((start + 1, "\n".join(lines[start:i])))
            start = None
    return blocks


def tiny_sd_with_text(tmp: Path):
    """StableDiffusionPipeline: tests/tiny_pipelines' UNet, a character-level CLIP tokenizer, a CLIP text encoder,
    2 steps unless told otherwise."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from tiny_pipelines import tiny_sd

    class TwoStepPipeline(StableDiffusionPipeline):
        def __call__(self, *args, num_inference_steps: int = 2, **kwargs):
            return super().__call__(*args, num_inference_steps=num_inference_steps, **kwargs)

    base = tiny_sd()
    pipe = TwoStepPipeline(**base.components, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    chars = [chr(c) for c in range(ord("a"), ord("z") + 1)] + list(".,!?'-0123456789")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in chars:
        vocab.setdefault(c, len(vocab))
        vocab.setdefault(c + "</w>", len(vocab))
    (tmp / "vocab.json").write_text(json.dumps(vocab))
    (tmp / "merges.txt").write_text("#version: 0.2\n")
    pipe.tokenizer = CLIPTokenizer(str(tmp / "vocab.json"), str(tmp / "merges.txt"), model_max_length=77)
    torch.manual_seed(0)
    pipe.text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=16, intermediate_size=32,
                                                     num_hidden_layers=1, num_attention_heads=2,
                                                     max_position_embeddings=77)).eval()
    pipe.register_modules(tokenizer=pipe.tokenizer, text_encoder=pipe.text_encoder)
    return pipe


class TwoPartDiT(torch.nn.Module):
    """my_dit(x, text): examples/_part_dit_model.PartDiT with 2 parts of 4x4x4 tokens and 16 text tokens, t = 0.5."""

    def __init__(self):
        super().__init__()
        sys.path.insert(0, str(README.parent / "examples"))
        from _part_dit_model import PartDiT

        torch.manual_seed(0)
        self.dit = PartDiT(parts=2, grid=(4, 4, 4), text_dim=24)

    def forward(self, x, text):
        return self.dit(x, text, torch.full((x.shape[0],), 0.5))


def stand_ins(source: str, tmp: Path) -> tuple[str, dict]:
    """The block's source with from_pretrained replaced, and the names the block expects the reader to bring."""
    names: dict = {"attncap": attncap, "torch": torch}
    if FROM_PRETRAINED.search(source):
        source = FROM_PRETRAINED.sub("_tiny_sd_with_text()", source)
        names["_tiny_sd_with_text"] = lambda: tiny_sd_with_text(tmp)
    used = {n.id for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Name)}
    if {"model", "inputs"} <= used:
        from test_capture_transformers import qwen_inputs, tiny_qwen2_vl

        inputs = qwen_inputs(batch=1)
        inputs.pop("mm_token_type_ids", None)
        names.update(model=tiny_qwen2_vl(), inputs=inputs)
    if "my_dit" in used:
        g = torch.Generator().manual_seed(0)
        names.update(my_dit=TwoPartDiT(), x=torch.randn(1, 2, 64, 8, generator=g),
                     text=torch.randn(1, 16, 24, generator=g))
    return source, names


def shape_claims(source: str) -> list[tuple[str, tuple[int, ...]]]:
    """(expression, shape) for each line "expr  # [2, 3, ...] ..." whose comment starts with numbers only."""
    claims = []
    for line in source.splitlines():
        found = re.match(r"^(\S[^#]*?)\s+#\s*\[([\d,\s]+)\]", line)
        if found:
            claims.append((found.group(1), tuple(int(x) for x in found.group(2).split(","))))
    return claims


BLOCKS = python_blocks()


def test_the_readme_has_python_blocks():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("line, source", BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_readme_block_runs_and_gives_what_it_says(line, source, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # blocks write maps/, pictures/
    code, names = stand_ins(source, tmp_path)
    with torch.no_grad():
        exec(compile(code, f"README.md:{line}", "exec"), names)
    made = [v for v in names.values() if isinstance(v, attncap.Store)]
    for store in made:
        assert len(store) > 0, "a store from the README holds no records"
    for call in re.finditer(r"relations=(\([^)]*\)|\"[^\"]*\")", source):
        asked = ast.literal_eval(call.group(1))
        for relation in (asked,) if isinstance(asked, str) else asked:
            assert any(r.relation == relation for s in made for r in s), f"no {relation} record"
    for value in names.values():
        if isinstance(value, dict) and value and all(isinstance(t, torch.Tensor) for t in value.values()):
            assert all(t.numel() for t in value.values())
    if "products" in names:
        assert names["products"], "attncap returned no products"
    for expr, shape in shape_claims(source):
        assert tuple(eval(expr, names).shape) == shape, f"{expr} is not {list(shape)}"
