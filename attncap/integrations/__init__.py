"""Integrations over the one capture path (attncap.session): diffusers pipelines and models
(diffusers/), transformers models and VLMs (transformers.py), and any module calling SDPA (generic.py)."""
