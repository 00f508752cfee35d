"""The embedded demo model: a tiny text-to-image diffusion model whose cross-attention grounds words.

It draws 32x32 scenes of pure-coloured shapes ("a red circle and a blue square"), so every demo,
test and tutorial shows attention maps that mean something without downloading any weights:

    import attncap
    from attncap.demo_model import load_pipeline

    pipe = load_pipeline()                       # ShapesPipeline from attncap/assets/shapes_model
    with attncap.capture(pipe, relations="image->text", layers="*attn2") as store:
        image = pipe("a red circle and a blue square", generator=torch.Generator().manual_seed(0)).images[0]
    store.tokens = attncap.prompts.for_pipeline(pipe, "a red circle and a blue square").to_tokens()
    store.token_map("circle", size=(32, 32))     # lands on the circle

Modules: scenes (the scene generator), tokenizer (word-level), text_encoder, pipeline
(ShapesPipeline), train (the seeded training script), grounding (the grounding benchmark).
diffusers and transformers are imported only when the pipeline is.
"""
from __future__ import annotations

from .scenes import COLOURS, SHAPES, Scene, make_scene, segment_colour

__all__ = ["COLOURS", "SHAPES", "Scene", "ShapesPipeline", "load_pipeline", "make_scene", "segment_colour",
           "MODEL_DIR"]


def __getattr__(name: str):
    if name in ("ShapesPipeline", "load_pipeline", "MODEL_DIR"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
