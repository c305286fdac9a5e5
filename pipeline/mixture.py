"""Several shard sets read as one, each with an upsampling factor (OpenCLIP's
`--train-data-upsampling-factors`): which samples make up each epoch.

Source s with N_s samples and weight w_s contributes w_s * N_s samples to an epoch: every sample
floor(w_s) times, plus a fresh seeded draw (without replacement) of the fractional part, so 1 is
each sample once, 0.5 a new half each epoch, 2 every sample twice. The per-source counts are
rounded by largest remainder so that the epoch length is the rounded weighted sum. The loader
then permutes the epoch's samples with its seeded permutation (pipeline/loader.py), so sample
order, rank slicing, determinism and exact mid-epoch resume are those of one shard set. With one
source of weight 1 the epoch is exactly the single shard set's.

Global sample indices run over the sources in the order given (source 0's samples first); the
tables of the sources are concatenated (`concat_tables`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.shards import SampleTable


def concat_tables(tables: list[SampleTable]) -> SampleTable:
    """One table over several shard sets, in order; shard ids and recorded bad samples shifted."""
    if len(tables) == 1:
        return tables[0]
    paths, shard, bad, first, shards = [], [], {}, 0, 0
    for t in tables:
        paths += t.paths
        shard.append(t.shard + shards)
        bad.update({first + i: r for i, r in t.recorded_bad.items()})
        first, shards = first + len(t), shards + len(t.paths)
    cat = lambda name: np.concatenate([getattr(t, name) for t in tables])  # noqa: E731
    return SampleTable(paths, np.concatenate(shard).astype(np.int32), cat("image"), cat("meta"), cat("text"), bad)


@dataclass(frozen=True)
class Mixture:
    sizes: tuple[int, ...]          # samples per source
    weights: tuple[float, ...]      # upsampling factor per source

    def __post_init__(self):
        if len(self.sizes) != len(self.weights):
            raise ValueError(f"{len(self.weights)} weights for {len(self.sizes)} sources")
        if any(not (w > 0 and math.isfinite(w)) for w in self.weights):
            raise ValueError(f"weights must be finite and > 0, got {list(self.weights)}")

    @property
    def offsets(self) -> np.ndarray:
        return np.concatenate([[0], np.cumsum(self.sizes)]).astype(np.int64)

    @property
    def trivial(self) -> bool:
        return all(w == 1 for w in self.weights)

    def counts(self) -> list[int]:
        """Samples each source gives an epoch: w_s * N_s rounded so that they sum to round(sum w_s * N_s)."""
        exact = [w * n for w, n in zip(self.weights, self.sizes)]
        counts = [math.floor(e) for e in exact]
        left = round(sum(exact)) - sum(counts)
        for s in sorted(range(len(exact)), key=lambda s: (counts[s] - exact[s], s))[:max(0, left)]:
            counts[s] += 1
        return counts

    def __len__(self) -> int:
        return sum(self.counts())

    def epoch_samples(self, seed: int, epoch: int) -> np.ndarray:
        """The global indices that make up `epoch` (unordered: the loader permutes them)."""
        if self.trivial:
            return np.arange(sum(self.sizes), dtype=np.int64)
        parts = []
        for s, (n, count, start) in enumerate(zip(self.sizes, self.counts(), self.offsets)):
            whole, rest = divmod(count, n) if n else (0, 0)
            idx = [np.tile(np.arange(n, dtype=np.int64), whole)]
            if rest:
                idx.append(np.sort(np.random.default_rng([seed, epoch, s, 0x5A3B]).choice(n, rest, replace=False)))
            parts.append(np.concatenate(idx) + start)
        return np.concatenate(parts)

    def source_of(self, indices: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.offsets, indices, side="right") - 1
