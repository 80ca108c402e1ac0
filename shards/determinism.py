"""Loaders that leave the training process's global RNG alone.

Every `iter(DataLoader)` draws its workers' base seed from a generator; without one it draws from torch's
*global* RNG, the stream that dropout and `torch.multinomial` (ITM hard negatives) also read. A run that
starts its loader at step 0 and a run resumed at step k (RNG state restored, then a new loader iterator)
then make that draw at different points of the stream, and every random op after the resume differs: the
cause of resumed losses drifting from the uninterrupted run's. A private generator seeded by
(seed, epoch, rank) makes the draw deterministic and keeps the global stream untouched.
"""
from __future__ import annotations

import torch


def loader_generator(seed: int, epoch: int, rank: int) -> torch.Generator:
    """A CPU generator for `DataLoader(generator=...)`, fixed by (seed, epoch, rank)."""
    g = torch.Generator()
    g.manual_seed((int(seed) * 1_000_003 + int(epoch) * 9_176 + int(rank)) % (2**63 - 1))
    return g
