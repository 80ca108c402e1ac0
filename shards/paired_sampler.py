"""Training order for grounding in which every two consecutive items are two expressions on one image that name
different objects (`data.paired`).

A grounding model can lower its loss a long way without reading the expression: box the most salient object,
segment every object. With independent samples that language-blind answer gets a consistent gradient; with two
expressions on the same image whose targets differ inside one batch, its gradients pull towards both targets and
cancel, while what depends on the expression adds up. The order is a pure function of (seed, epoch, rank), so a
resumed run (which skips the epoch's first batches) sees the same remaining items.
"""
from __future__ import annotations

from collections import defaultdict
from typing import Iterator, Sequence

import torch
from torch.utils.data import Sampler


class PairedExpressionSampler(Sampler[int]):
    """`items` are one (image, target object) pair per expression, in dataset order. Each epoch draws a random order of
    anchors; each anchor is followed by a partner from the same image naming a different object (falling back
    to another expression for the same object, then to any item, for images with one referred object). Pairs are
    dealt to ranks round-robin, the same number to every rank (the remainder is dropped, like
    DistributedSampler's drop_last), so each rank yields 2 * ((len(items) // 2) // world_size) indices."""

    def __init__(self, items: Sequence[tuple], *, rank: int, world_size: int, seed: int = 0) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.n, self.rank, self.world, self.seed, self.epoch = len(items), rank, world_size, seed, 0
        by_image: dict[int, list[int]] = defaultdict(list)
        for i, (img, _) in enumerate(items):
            by_image[img].append(i)
        self.other_ref: list[list[int]] = []      # per item: items of its image naming another object
        self.same_ref: list[list[int]] = []       # per item: other expressions for its own object
        for i, (img, ref) in enumerate(items):
            peers = by_image[img]
            self.other_ref.append([j for j in peers if items[j][1] != ref])
            self.same_ref.append([j for j in peers if items[j][1] == ref and j != i])
        self.pairs_per_rank = (self.n // 2) // world_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return 2 * self.pairs_per_rank

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(int(self.seed) * 1_000_003 + int(self.epoch))
        anchors = torch.randperm(self.n, generator=g)[: self.pairs_per_rank * self.world].tolist()
        draws = torch.rand(len(anchors), generator=g).tolist()
        fallback = torch.randint(self.n, (len(anchors),), generator=g).tolist()
        for k in range(self.rank, len(anchors), self.world):
            a = anchors[k]
            pool = self.other_ref[a] or self.same_ref[a]
            yield a
            yield pool[int(draws[k] * len(pool))] if pool else fallback[k]
