"""Integrations: diffusers processors (and, later, transformers and a generic SDPA hook)."""
