"""Files shipped inside the attncap package.

shapes_model/   the embedded demo model (attncap.demo_model): a diffusers pipeline folder
                (model_index.json, unet/, text_encoder/, tokenizer/, scheduler/ with safetensors
                weights and JSON configs), loaded with attncap.demo_model.load_pipeline().
"""
from pathlib import Path

ASSETS_DIR = Path(__file__).resolve().parent
SHAPES_MODEL_DIR = ASSETS_DIR / "shapes_model"
