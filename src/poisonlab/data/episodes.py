"""Few-shot episode sampler: batches of N-way K-shot tasks drawn from a class bank.

The episode protocol is that of Vinyals et al., "Matching Networks for One Shot Learning"
(NeurIPS 2016), as used for MAML by Finn et al., "Model-Agnostic Meta-Learning for Fast
Adaptation of Deep Networks" (ICML 2017): each task picks N distinct classes, relabels them
0..N-1 in a random order, and draws K support and Q query images per class without replacement.
With ``rotate=True`` each class of a task is rotated by a random multiple of 90 degrees, the
class-augmentation of Santoro et al., "Meta-Learning with Memory-Augmented Neural Networks"
(ICML 2016).

Sampling is vectorised: index tensors chosen with ``torch.rand(...).topk`` gather the whole
batch at once, and rotations are one more gather through the pixel permutation of each
class's angle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from poisonlab.data.types import FewShotData
from poisonlab.errors import ConfigError, DataError


@dataclass
class Episodes:
    """A batch of B tasks in class-major layout (labels [0]*K + [1]*K + ... + [N-1]*K).

    support_x: [B, N*K, C, H, W]; support_y: [B, N*K] int64 in 0..N-1
    query_x: [B, N*Q, C, H, W];   query_y: [B, N*Q] int64 in 0..N-1
    classes: [B, N] the index in the class bank of each task label
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    classes: Tensor

    @property
    def batch(self) -> int:
        return int(self.support_x.shape[0])

    @property
    def ways(self) -> int:
        return int(self.classes.shape[1])

    def to(self, device: torch.device | str) -> Episodes:
        """A copy with every tensor on `device`."""
        return Episodes(
            support_x=self.support_x.to(device),
            support_y=self.support_y.to(device),
            query_x=self.query_x.to(device),
            query_y=self.query_y.to(device),
            classes=self.classes.to(device),
        )

    def task(self, i: int) -> Episodes:
        """Task `i` alone, as a batch of one."""
        sl = slice(i, i + 1)
        return Episodes(
            self.support_x[sl], self.support_y[sl], self.query_x[sl], self.query_y[sl],
            self.classes[sl],
        )


class EpisodeSampler:
    """Draws batches of `ways`-way `shots`-shot tasks with `queries` query images per class.

    `sample(batch)` continues the sampler's own generator (seeded by `seed`); `sample_fixed`
    draws from a fresh generator, so the same (batch, seed) always gives the same tasks, e.g.
    to evaluate several attack settings on identical tasks.
    """

    def __init__(
        self,
        data: FewShotData,
        ways: int,
        shots: int,
        queries: int,
        rotate: bool = False,
        seed: int = 0,
    ) -> None:
        _validate(data, ways, shots, queries, rotate)
        self.data = data
        self.ways = int(ways)
        self.shots = int(shots)
        self.queries = int(queries)
        self.rotate = bool(rotate)
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)

    def sample(self, batch: int) -> Episodes:
        """The next `batch` tasks from the sampler's generator."""
        return self._draw(batch, self.generator)

    def sample_fixed(self, batch: int, seed: int) -> Episodes:
        """`batch` tasks drawn from a generator seeded with `seed` (the sampler's own is untouched)."""
        return self._draw(batch, torch.Generator().manual_seed(int(seed)))

    def _draw(self, batch: int, gen: torch.Generator) -> Episodes:
        if batch < 1:
            raise ConfigError(f"batch={batch} must be at least 1")
        n, k, q = self.ways, self.shots, self.queries
        images = self.data.images
        num_classes, per_class = images.shape[:2]
        # the n largest of iid uniforms: a uniformly random ordered subset without replacement
        classes = torch.rand(batch, num_classes, generator=gen).topk(n, dim=1).indices
        picks = torch.rand(batch, n, per_class, generator=gen).topk(k + q, dim=2).indices
        dev = images.device
        x = images[classes.to(dev).unsqueeze(-1), picks.to(dev)]  # [B, N, K+Q, C, H, W]
        if self.rotate:
            x = _rotate_classes(x, torch.randint(0, 4, (batch, n), generator=gen).to(dev))
        tail = x.shape[3:]
        labels = torch.arange(n, device=dev)
        return Episodes(
            support_x=x[:, :, :k].reshape(batch, n * k, *tail),
            support_y=labels.repeat_interleave(k).expand(batch, -1).contiguous(),
            query_x=x[:, :, k:].reshape(batch, n * q, *tail),
            query_y=labels.repeat_interleave(q).expand(batch, -1).contiguous(),
            classes=classes.to(dev),
        )


def _rotate_classes(x: Tensor, quarter_turns: Tensor) -> Tensor:
    """Rotate x[b, c] ([S, C, H, W]) by quarter_turns[b, c] * 90 degrees in one gather.

    The four pixel permutations of a square image are precomputed with torch.rot90; each
    class then gathers its pixels through the permutation of its angle.
    """
    height, width = x.shape[-2:]
    grid = torch.arange(height * width, device=x.device).view(height, width)
    perms = torch.stack([torch.rot90(grid, t).reshape(-1) for t in range(4)])
    flat = x.flatten(-2)  # [B, N, S, C, H*W]
    index = perms[quarter_turns][:, :, None, None, :].expand_as(flat)
    return flat.gather(-1, index).view_as(x)


def _validate(data: FewShotData, ways: int, shots: int, queries: int, rotate: bool) -> None:
    if data.images.dim() != 5:
        raise DataError(
            f"few-shot images must have shape [classes, samples, C, H, W], "
            f"got {tuple(data.images.shape)}"
        )
    if ways < 2:
        raise ConfigError(f"ways={ways} must be at least 2")
    if shots < 1:
        raise ConfigError(f"shots={shots} must be at least 1")
    if queries < 1:
        raise ConfigError(f"queries={queries} must be at least 1")
    if ways > data.num_classes:
        raise DataError(f"ways={ways} exceeds the {data.num_classes} classes available")
    if shots + queries > data.samples_per_class:
        raise DataError(
            f"shots+queries={shots + queries} exceeds the {data.samples_per_class} "
            f"samples per class"
        )
    height, width = data.images.shape[-2:]
    if rotate and height != width:
        raise DataError(f"rotate=True needs square images, got {height}x{width}")
