"""Timesteps of pipelines that pass the denoiser a flipped, normalised time (Lumina 2, Z-Image)."""
from __future__ import annotations

from dataclasses import dataclass

from .base import Timestep


@dataclass(frozen=True)
class FlippedTimestep(Timestep):
    """The pipeline passes (T - t) / T (0 at pure noise); the scheduler's t is T * (1 - value)."""
    train_steps: float = 1000.0

    def read(self, args, kwargs) -> float | None:
        value = super().read(args, kwargs)
        return None if value is None else self.train_steps * (1.0 - value)
