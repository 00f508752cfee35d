"""QwenImage / QwenImage-Edit adapter: joint [text, image, cond_image] on a tiny random transformer."""
from __future__ import annotations

import pytest
import torch

from family_harness import check_family, default_relations

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT, GRID, COND_GRID = 7, (4, 6), (2, 4)


def tiny_qwenimage():
    from diffusers import QwenImageTransformer2DModel

    torch.manual_seed(0)
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                       attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                       axes_dims_rope=(8, 4, 4)).eval()


def qwen_call(model, edit: bool):
    g = torch.Generator().manual_seed(1)
    shapes = [(1, *GRID)] + ([(1, *COND_GRID)] if edit else [])
    n = sum(f * h * w for f, h, w in shapes)
    inputs = dict(hidden_states=torch.randn(1, n, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, TEXT, 16, generator=g),
                  encoder_hidden_states_mask=torch.ones(1, TEXT, dtype=torch.long),
                  timestep=torch.tensor([0.5]), img_shapes=[shapes])
    return lambda: model(**inputs)


@pytest.mark.parametrize("edit", [False, True], ids=["t2i", "edit"])
def test_qwenimage_maps_equal_softmax(edit):
    model = tiny_qwenimage()
    ni, nc = GRID[0] * GRID[1], COND_GRID[0] * COND_GRID[1] if edit else 0
    segs = {"text": (0, TEXT, None), "image": (TEXT, TEXT + ni, GRID)}
    if edit:
        segs["cond_image"] = (TEXT + ni, TEXT + ni + nc, COND_GRID)
    check_family(model, qwen_call(model, edit), {"*": [(segs, segs)]}, pool=(3, 4))
    assert default_relations(model, qwen_call(model, edit)) == {("image->text", GRID)}
