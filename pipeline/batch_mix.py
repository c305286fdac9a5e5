"""Finetuning's batch-level augmentations: random erasing, mixup and cutmix, with smoothed targets.

They follow timm (as the BEiT finetuning recipe uses it) and split as everything else here does: the
random parameters are drawn in numpy from the loader's seeded stream (`draw_erasing`, `draw_mix`), so
a resumed run re-creates them exactly; the pixels are changed in torch on the training device after
the loader (`apply_erasing`, `apply_mix`), as timm's prefetcher does on the GPU.

- Random erasing (timm `RandomErasing`, mode "pixel", one box): per image with probability p, up to
  10 tries of (area ~ U(0.02, 1/3) of the image, log aspect ~ U(log 0.3, log 1/0.3)); the first box
  that fits strictly inside the image is filled with per-pixel standard-normal noise (the images are
  already normalised, so noise is "any plausible pixel"). Erasing comes before mixing, as in timm.
- Mixup / cutmix (timm `Mixup`, mode "batch"): with probability `prob` the whole batch is mixed with
  itself reversed; cutmix with probability `switch_prob`, else mixup. Mixup: lambda ~ Beta(0.8, 0.8),
  x = lambda x + (1 - lambda) x_reversed. Cutmix: lambda ~ Beta(1, 1), a box of side sqrt(1 - lambda)
  times the image's, centred uniformly and clipped to the image, is pasted from the reversed batch,
  and lambda is then corrected to the share of the image that stayed (timm's `correct_lam`).
- Targets: label smoothing (off = s / C, on = 1 - s + off), mixed with the same lambda as the
  pixels, so every target row sums to one.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch


@dataclass
class MixRecipe:
    """The batch-level numbers of the finetuning recipe (BEiT's defaults)."""
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0                  # share of batches that are mixed at all
    switch_prob: float = 0.5           # of those, the share mixed by cutmix
    label_smoothing: float = 0.1
    erasing_prob: float = 0.25
    erasing_area: tuple[float, float] = (0.02, 1 / 3)
    erasing_ratio: tuple[float, float] = (0.3, 1 / 0.3)
    erasing_tries: int = 10

    def __post_init__(self):
        for name in ("prob", "switch_prob", "erasing_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must lie in [0, 1], got {getattr(self, name)}")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError("mixup_alpha and cutmix_alpha must be >= 0 (0 turns one off)")
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"label_smoothing must lie in [0, 1), got {self.label_smoothing}")

    @property
    def mixes(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)


@dataclass(frozen=True)
class MixDraw:
    """How one batch is mixed: lam is the weight of the batch itself (box-corrected for cutmix)."""
    mode: Literal["none", "mixup", "cutmix"]
    lam: float
    box: tuple[int, int, int, int] = (0, 0, 0, 0)   # cutmix: (top, bottom, left, right) in pixels


@dataclass(frozen=True)
class ErasingDraw:
    boxes: np.ndarray       # int64 [B, 4] (top, left, height, width); height 0 = not erased
    noise_seed: int         # the noise itself comes from a torch generator seeded with this


def draw_mix(rng: np.random.Generator, recipe: MixRecipe, height: int, width: int) -> MixDraw:
    """The mixing of one batch of `height` x `width` images (timm `Mixup._params_per_batch`)."""
    # always draw the same numbers in the same order, so the stream does not depend on the outcome
    u_mix, u_switch = rng.random(), rng.random()
    lam_mixup = rng.beta(recipe.mixup_alpha, recipe.mixup_alpha) if recipe.mixup_alpha > 0 else 1.0
    lam_cutmix = rng.beta(recipe.cutmix_alpha, recipe.cutmix_alpha) if recipe.cutmix_alpha > 0 else 1.0
    cy, cx = int(rng.integers(0, height)), int(rng.integers(0, width))
    if not (recipe.mixes and u_mix < recipe.prob):
        return MixDraw("none", 1.0)
    if recipe.cutmix_alpha > 0 and (recipe.mixup_alpha == 0 or u_switch < recipe.switch_prob):
        side = math.sqrt(1.0 - lam_cutmix)
        cut_h, cut_w = int(height * side), int(width * side)
        top, bottom = np.clip([cy - cut_h // 2, cy + cut_h // 2], 0, height)
        left, right = np.clip([cx - cut_w // 2, cx + cut_w // 2], 0, width)
        lam = 1.0 - (bottom - top) * (right - left) / (height * width)
        return MixDraw("cutmix", float(lam), (int(top), int(bottom), int(left), int(right)))
    return MixDraw("mixup", float(lam_mixup))


def draw_erasing(rng: np.random.Generator, recipe: MixRecipe, batch: int, height: int, width: int) -> ErasingDraw:
    """Per image, the box random erasing fills (timm `RandomErasing._erase`, one box), vectorised."""
    tries = recipe.erasing_tries
    erase = rng.random(batch) < recipe.erasing_prob
    area = rng.uniform(*recipe.erasing_area, (batch, tries)) * height * width
    aspect = np.exp(rng.uniform(math.log(recipe.erasing_ratio[0]), math.log(recipe.erasing_ratio[1]), (batch, tries)))
    h = np.rint(np.sqrt(area * aspect)).astype(np.int64)
    w = np.rint(np.sqrt(area / aspect)).astype(np.int64)
    fits = (h < height) & (w < width) & (h > 0) & (w > 0)
    first = fits.argmax(axis=1)
    rows = np.arange(batch)
    ok = erase & fits[rows, first]
    h, w = np.where(ok, h[rows, first], 0), np.where(ok, w[rows, first], 0)
    top = np.floor(rng.random(batch) * (height - h + 1)).astype(np.int64)
    left = np.floor(rng.random(batch) * (width - w + 1)).astype(np.int64)
    noise_seed = int(rng.integers(0, 2 ** 63 - 1))
    return ErasingDraw(np.stack([top, left, h, w], 1), noise_seed)


def apply_erasing(images: torch.Tensor, draw: ErasingDraw) -> torch.Tensor:
    """Fill each drawn box of the [B, C, H, W] batch with standard-normal noise, in place."""
    gen = torch.Generator(device=images.device).manual_seed(draw.noise_seed)
    for i, (top, left, h, w) in enumerate(draw.boxes.tolist()):
        if h:
            noise = torch.randn((images.shape[1], h, w), generator=gen, device=images.device, dtype=torch.float32)
            images[i, :, top:top + h, left:left + w] = noise.to(images.dtype)
    return images


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device, dtype=torch.float32)
    return out.scatter_(1, labels[:, None], 1.0 - smoothing + off)


def apply_mix(images: torch.Tensor, labels: torch.Tensor, draw: MixDraw, num_classes: int,
              smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(mixed images, soft targets [B, num_classes]); the images are changed in place."""
    target = smooth_one_hot(labels, num_classes, smoothing)
    if draw.mode == "none":
        return images, target
    reversed_images = images.flip(0)
    if draw.mode == "cutmix":
        top, bottom, left, right = draw.box
        images[:, :, top:bottom, left:right] = reversed_images[:, :, top:bottom, left:right]
    else:
        images.mul_(draw.lam).add_(reversed_images.mul_(1.0 - draw.lam))
    return images, target * draw.lam + target.flip(0) * (1.0 - draw.lam)
