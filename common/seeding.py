"""Seeding, and per-sample noise so that an image depends on its seed and index, never on the batch size."""
from __future__ import annotations

import math
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


def validation_generator(batch_idx: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator for validation batch `batch_idx`: the same timesteps and noise at every validation (and
    whatever the run's seed), so that validation losses compare across steps, checkpoints and runs."""
    return torch.Generator(device=device).manual_seed(1000 + batch_idx)


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


# On the CPU, a network's output for one image is the same bits in every batch only when the batch has a
# size whose kernels compute each row the same way: measured on P1's UNet (2 threads and 1), matrix products
# of fewer than 16 rows, or of a row count that is not a multiple of 4, take other code paths than large
# batches (up to 4e-6 apart, enough to move a pixel by one level), and a convolution of one image another
# still; batches padded to a multiple of 16 rows gave the bits of a batch of 1024 for every size tried.
# On CUDA, cuDNN and cuBLAS pick kernels by shape as well, and padding would cost memory: no promise there.
BATCH_QUANTUM = 16


def padded_size(n: int, rows_per_item: int = 1, device: torch.device | str = "cpu") -> int:
    """How many items a sampler batch of `n` items is padded to so that each network forward, which sees
    `rows_per_item` rows an item (2 with classifier-free guidance), has a multiple of BATCH_QUANTUM rows
    (on the CPU; elsewhere n)."""
    if torch.device(device).type != "cpu":
        return n
    step = BATCH_QUANTUM // math.gcd(BATCH_QUANTUM, rows_per_item)
    return -(-n // step) * step


def pad_items(items, size: int):
    """A batch (a tensor, by its first dimension, or a list) padded to `size` items with copies of its last
    item. The copies are computed and dropped: every real item's result is then that of any batch size."""
    n = len(items)
    if size <= n:
        return items
    if isinstance(items, torch.Tensor):
        return torch.cat([items, items[-1:].expand(size - n, *items.shape[1:])])
    return list(items) + [items[-1]] * (size - n)
