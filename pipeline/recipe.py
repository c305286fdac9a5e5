"""The augmentation recipe: every number the DALI graph, the pillow path (and the reference
pipeline) use.

Defaults are the SLIP reference recipe (facebookresearch/SLIP). One object drives the DALI graph on
GPU and CPU, the pillow path, the previews and the benchmark, so they can never drift apart.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.batch_mix import MixRecipe
from pipeline.rand_augment import RandAugmentRecipe


@dataclass
class AugmentationRecipe:
    image_size: int = 224
    # CLIP view: RandomResizedCrop only.
    clip_scale: tuple[float, float] = (0.5, 1.0)
    clip_flip_prob: float = 0.0     # the finetuning view is this view with a flip (0.5) and RandAugment
    # SimCLR views: RandomResizedCrop + colour jitter + grayscale + blur + flip.
    num_ssl_views: int = 2          # 0 for a CLIP-only (or nCLIP) run: the graph skips them
    ssl_scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.4
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    flip_prob: float = 0.5
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    # Antialiased downscaling in the crop resize, as PIL's bilinear resize in the reference.
    # False makes the DALI CPU graph faster at the price of aliasing on downscales, and the pillow
    # path slower (PIL samples without antialiasing only through its generic `transform`).
    antialias: bool = True
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"   # of the crop resize; finetuning: bicubic
    # Finetuning only (both off in pretraining, where they draw nothing): RandAugment on the first
    # view (pipeline/rand_augment.py), and erasing / mixup / cutmix on the batch (pipeline/batch_mix.py).
    rand_augment: RandAugmentRecipe = field(default_factory=lambda: RandAugmentRecipe(num_ops=0))
    mix: MixRecipe = field(default_factory=lambda: MixRecipe(prob=0.0, erasing_prob=0.0, label_smoothing=0.0))
    # Evaluation transform: Resize(eval_resize) + CenterCrop(image_size).
    eval_resize: int | None = None  # None -> image_size (zero-shot); linear probe uses 256/224 ratio
