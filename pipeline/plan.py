"""The batch plan: everything about one batch that is decided before any pixel is touched.

A loader makes plans (which samples, their encoded images, their tokens or labels, every random
parameter of every view); an augmenter (pipeline/augment.py) turns a plan into pixels. A plan is
plain data and a pure function of (seed, epoch, rank, step) and the data set, so it can be made
again at any time: to resume, to preview, to test that an augmenter applied what it says.
"""
from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass, field

import numpy as np

from pipeline.batch_mix import ErasingDraw, MixDraw
from pipeline.rand_augment import RandAugmentDraw
from pipeline.view_params import ViewParams


@dataclass(frozen=True, eq=False)
class BatchPlan:
    epoch: int
    step: int
    indices: np.ndarray                  # int64 [B] global sample indices (manifest order)
    encoded: list[np.ndarray]            # uint8 [n_bytes] encoded image, per sample
    sizes: np.ndarray                    # int64 [B, 2] (height, width) read from each image header
    tokens: np.ndarray | None            # int64 [B, context_length]; None where there is no text
    views: dict[str, ViewParams]         # output name ("clip_image", "ssl_image_1", ...) -> its draws
    labels: np.ndarray | None = None     # int64 [B] class labels (classification); None in pretraining
    bad: collections.Counter = field(default_factory=collections.Counter)   # samples replaced, by reason
    # finetuning only: RandAugment of the first view; erasing and mixing of the batch (on the device)
    rand_augment: RandAugmentDraw | None = None
    erasing: ErasingDraw | None = None
    mix: MixDraw | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def subset(self, slots: list[int]) -> BatchPlan:
        """The plan of a batch made of these samples (positions in this batch) only, with their draws."""
        take = np.asarray(slots, dtype=np.int64)
        views = {name: dataclasses.replace(p, **{f.name: getattr(p, f.name)[take] for f in dataclasses.fields(p)})
                 for name, p in self.views.items()}
        ra = self.rand_augment
        if ra is not None:
            ra = RandAugmentDraw(ra.op[take], ra.apply[take], ra.argument[take])
        erasing = None if self.erasing is None else ErasingDraw(self.erasing.boxes[take], self.erasing.noise_seed)
        return BatchPlan(self.epoch, self.step, self.indices[take], [self.encoded[i] for i in slots],
                         self.sizes[take], None if self.tokens is None else self.tokens[take], views,
                         None if self.labels is None else self.labels[take], rand_augment=ra, erasing=erasing,
                         mix=self.mix)
