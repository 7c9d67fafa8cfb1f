"""Seeding, and per-sample noise so that an image depends on its seed and index, never on the batch size."""
from __future__ import annotations

import os
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (CPU and every CUDA device)."""
    os.environ["PYTHONHASHSEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for sample `index` of a run seeded with `seed` (a SplitMix64 mix, so neighbours differ)."""
    z = (seed * 0x9E3779B97F4A7C15 + index + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


class PerSampleNoise:
    """Gaussian noise drawn from one CPU generator per sample.

    Sample `i` of a batch draws from its own generator seeded by `sample_seed(seed, index_i)`, and each
    draw advances only that generator, so the noise a sample sees is the same whatever batch it is in.
    Noise is drawn on the CPU (bit-identical on every machine) and then moved to `device`.
    """

    def __init__(self, seed: int, indices, device: torch.device | str = "cpu"):
        self.generators = []
        for i in indices:
            g = torch.Generator(device="cpu")
            g.manual_seed(sample_seed(seed, int(i)))
            self.generators.append(g)
        self.device = torch.device(device)

    def __len__(self) -> int:
        return len(self.generators)

    def randn(self, *sample_shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A (len(self), *sample_shape) tensor of N(0, 1) noise."""
        out = torch.stack([torch.randn(sample_shape, generator=g, dtype=dtype) for g in self.generators])
        return out.to(self.device)
