"""RandAugment as timm's `rand-m9-mstd0.5-inc1`, split into drawing (numpy) and applying (pillow).

The finetuning recipe (BEiT, used by the SLIP reference) applies timm's RandAugment to each
training crop. timm draws inside the transform; here every choice is drawn by the loader from its
seeded stream (`draw_rand_augment`), so a resumed run and both augmenters see the same operations.

Per image: `num_ops` (2) operations chosen uniformly with replacement from the 15 of timm's
increasing set, applied in the order drawn, each only with probability `prob` (0.5); each draws a
magnitude ~ N(9, 0.5) clipped to [0, 10], and the signed ones a sign (+/- with probability 1/2).
Magnitude m maps to the operation's argument as timm's `*_increasing` level functions do:

| operation | argument at magnitude m |
| --- | --- |
| AutoContrast, Equalize, Invert | none |
| Rotate | +/- 30 m / 10 degrees |
| PosterizeIncreasing | keep 4 - int(4 m / 10) bits |
| SolarizeIncreasing | invert pixels >= 256 - int(256 m / 10) |
| SolarizeAdd | add int(110 m / 10) to pixels < 128, capped at 255 |
| Color/Contrast/Brightness/SharpnessIncreasing | enhance factor 1 +/- 0.9 m / 10 (at least 0.1) |
| ShearX, ShearY | +/- 0.3 m / 10 |
| TranslateXRel, TranslateYRel | +/- 0.45 m / 10 of the width / height |

Geometric operations resample bicubically (the recipe's interpolation) and fill with the dataset
mean in 0-255 (timm's `img_mean` hparam).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

OPS = ("AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
       "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing",
       "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
SIGNED = frozenset({"Rotate", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
                    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel"})
LEVEL_MAX = 10.0


@dataclass
class RandAugmentRecipe:
    num_ops: int = 2
    prob: float = 0.5
    magnitude: float = 9.0
    magnitude_std: float = 0.5

    def __post_init__(self):
        if self.num_ops < 0:
            raise ValueError(f"num_ops must be >= 0, got {self.num_ops}")
        if not 0 <= self.prob <= 1:
            raise ValueError(f"prob must lie in [0, 1], got {self.prob}")
        if not 0 <= self.magnitude <= LEVEL_MAX or self.magnitude_std < 0:
            raise ValueError("magnitude must lie in [0, 10] and magnitude_std be >= 0")


@dataclass
class RandAugmentDraw:
    """Arrays [B, num_ops]: which operation (index into OPS), whether it applies, its argument."""
    op: np.ndarray         # int64
    apply: np.ndarray      # bool
    argument: np.ndarray   # float64; see `argument`: degrees, factor, bits, threshold, pixels' share

    def operations(self, i: int) -> list[tuple[str, float]]:
        """The operations image i gets, in order, with their arguments."""
        return [(OPS[o], a) for o, on, a in zip(self.op[i], self.apply[i], self.argument[i]) if on]


def argument(name: str, magnitude: np.ndarray, sign: np.ndarray) -> np.ndarray:
    """timm's level-to-argument function of `name`, vectorised; sign is +1 or -1."""
    m = magnitude / LEVEL_MAX
    if name == "Rotate":
        return sign * 30.0 * m
    if name == "PosterizeIncreasing":
        return 4.0 - np.floor(4.0 * m)
    if name == "SolarizeIncreasing":
        return 256.0 - np.floor(256.0 * m)
    if name == "SolarizeAdd":
        return np.floor(110.0 * m)
    if name.endswith("Increasing"):
        return np.maximum(0.1, 1.0 + sign * 0.9 * m)
    if name in ("ShearX", "ShearY"):
        return sign * 0.3 * m
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * 0.45 * m
    return np.zeros_like(m)


def draw_rand_augment(rng: np.random.Generator, recipe: RandAugmentRecipe, batch: int) -> RandAugmentDraw:
    """The operations of a batch; the same numbers are drawn whatever comes out, so the stream after
    this call does not depend on the outcome."""
    shape = (batch, recipe.num_ops)
    op = rng.integers(0, len(OPS), shape)
    apply = rng.random(shape) < recipe.prob
    magnitude = np.clip(recipe.magnitude + recipe.magnitude_std * rng.standard_normal(shape), 0.0, LEVEL_MAX)
    sign = np.where(rng.random(shape) < 0.5, -1.0, 1.0)
    args = np.zeros(shape)
    for k, name in enumerate(OPS):
        here = op == k
        args[here] = argument(name, magnitude[here], sign[here])
    return RandAugmentDraw(op, apply, args)


def apply_op(img: Image.Image, name: str, arg: float, fill: tuple[int, int, int],
             resample: int = Image.BICUBIC) -> Image.Image:
    """One operation on an RGB image, as timm's `auto_augment` implements it."""
    affine = dict(resample=resample, fillcolor=fill)
    w, h = img.size
    if name == "AutoContrast":
        return ImageOps.autocontrast(img)
    if name == "Equalize":
        return ImageOps.equalize(img)
    if name == "Invert":
        return ImageOps.invert(img)
    if name == "Rotate":
        return img.rotate(arg, **affine)
    if name == "PosterizeIncreasing":
        return img if arg >= 8 else ImageOps.posterize(img, int(arg))
    if name == "SolarizeIncreasing":
        return ImageOps.solarize(img, int(arg))
    if name == "SolarizeAdd":
        add = int(arg)
        return img.point([min(255, i + add) if i < 128 else i for i in range(256)] * 3)
    if name == "ColorIncreasing":
        return ImageEnhance.Color(img).enhance(arg)
    if name == "ContrastIncreasing":
        return ImageEnhance.Contrast(img).enhance(arg)
    if name == "BrightnessIncreasing":
        return ImageEnhance.Brightness(img).enhance(arg)
    if name == "SharpnessIncreasing":
        return ImageEnhance.Sharpness(img).enhance(arg)
    if name == "ShearX":
        return img.transform(img.size, Image.AFFINE, (1, arg, 0, 0, 1, 0), **affine)
    if name == "ShearY":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, arg, 1, 0), **affine)
    if name == "TranslateXRel":
        return img.transform(img.size, Image.AFFINE, (1, 0, arg * w, 0, 1, 0), **affine)
    if name == "TranslateYRel":
        return img.transform(img.size, Image.AFFINE, (1, 0, 0, 0, 1, arg * h), **affine)
    raise ValueError(f"unknown RandAugment operation {name!r}")


def apply_pil(img: Image.Image, draw: RandAugmentDraw, i: int, fill: tuple[int, int, int]) -> Image.Image:
    """Image i's drawn operations, in order."""
    for name, arg in draw.operations(i):
        img = apply_op(img, name, arg, fill)
    return img


def fill_colour(mean: tuple[float, float, float]) -> tuple[int, int, int]:
    """timm's `img_mean`: the normalisation mean in 0-255, rounded."""
    return tuple(min(255, round(255 * m)) for m in mean)
