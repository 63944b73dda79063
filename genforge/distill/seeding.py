"""Independent, reproducible random streams per (run seed, iteration, class).

Engines draw every random choice of iteration ``it`` for class ``c`` (real batch, DSA seed)
from ``stream(seed, it, c)`` and the matching network of iteration ``it`` from
``stream(seed, it, NET)``. So a resumed run continues exactly, and processes that each
distil a subset of the classes draw the same network and the same per-class batches as a
single process would.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["INIT_STREAM", "NET", "stream", "stream_seed"]

NET = 1 << 20
INIT_STREAM = 1 << 25


def stream_seed(*keys: int) -> int:
    """A 63-bit seed derived from the integer ``keys`` (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, dtype=np.uint32)
               .astype(np.uint64).dot(np.array([1 << 31, 1], dtype=np.uint64)))


def stream(*keys: int) -> torch.Generator:
    """A CPU generator seeded from ``keys``."""
    return torch.Generator().manual_seed(stream_seed(*keys))
