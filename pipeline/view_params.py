"""Per-sample random parameters of each augmented view, drawn in numpy from the recipe.

Drawing them here instead of inside DALI makes every view a pure function of (seed, epoch, rank,
batch): a resumed run re-creates exactly the views it would have seen, a fixed seed reproduces a
batch bit for bit, and the tests can check both the distributions and that DALI applied them.

Semantics follow torchvision, as used by the SLIP reference:
- RandomResizedCrop: up to 10 tries of (area fraction ~ U(scale), log aspect ~ U(log ratio)),
  rounded to whole pixels; the first that fits wins, else a centre crop clamped to the ratio range.
- ColorJitter with probability p: brightness ~ U[1-b, 1+b], contrast ~ U[1-c, 1+c],
  saturation ~ U[1-s, 1+s], hue ~ U[-h, h] of the colour circle (h * 360 degrees).
- RandomGrayscale: saturation forced to 0 after jitter (luma 0.299/0.587/0.114, as torchvision).
- GaussianBlur with probability p: sigma ~ U(sigma range); 0 means no blur.
- Horizontal flip: the crop window is mirrored (DALI's resize flips a reversed ROI for free).

The augmenters apply these parameters in the form their fastest operators take, with the helpers
here: jitter and grayscale become one 3x4 affine colour matrix per sample (`color_matrix`, both
augmenters); the DALI graph blurs with two 1-D Gaussian kernels (`blur_kernels`), the pillow
path with the sample's sigma directly. Where this differs from torchvision, by choice:
- the four jitter operations compose in the fixed order brightness, contrast, saturation, hue
  (torchvision draws a random order) and clip to [0, 255] once, at the end;
- contrast pivots on mid-grey (128, as DALI's own colour operators) instead of the image's mean
  grey level, which is unknown before decoding;
- hue rotates the chroma plane of YIQ (as DALI's `hue`/`color_twist`), a linear stand-in for
  torchvision's HSV hue shift; grey stays grey, and a rotation of 0 is exact.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.recipe import AugmentationRecipe

CROP_ATTEMPTS = 10   # torchvision's RandomResizedCrop


@dataclass
class ViewParams:
    """One view of a batch; arrays of length B (float32 unless noted)."""
    roi_start: np.ndarray    # [B, 2] (y, x), relative to the image; x0 > x1 means mirrored
    roi_end: np.ndarray      # [B, 2]
    brightness: np.ndarray
    contrast: np.ndarray
    saturation: np.ndarray
    hue: np.ndarray          # degrees
    blur_sigma: np.ndarray   # 0 = not blurred
    flip: np.ndarray         # bool
    jitter: np.ndarray       # bool
    gray: np.ndarray         # bool

    def crop_area_fraction(self) -> np.ndarray:
        """Area of the crop window over the image area."""
        size = np.abs(self.roi_end - self.roi_start)
        return size[:, 0] * size[:, 1]


# RGB -> YIQ (NTSC); luma row = torchvision's grayscale weights, so grey is a fixed point.
_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])
_YIQ_INV = np.linalg.inv(_YIQ)
LUMA = _YIQ[0]
MID_GREY = 128.0


def color_matrix(p: ViewParams) -> np.ndarray:
    """Per-sample affine colour transform [B, 3, 4] (M | T) on 0-255 RGB: jitter, then grayscale."""
    b = len(p.brightness)
    eye = np.broadcast_to(np.eye(3), (b, 3, 3))
    bc = (p.brightness * p.contrast)[:, None, None] * eye
    sat = p.saturation[:, None, None] * eye + (1 - p.saturation)[:, None, None] * np.ones((3, 1)) * LUMA
    theta = np.deg2rad(p.hue)
    rot = np.zeros((b, 3, 3))
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2] = np.cos(theta), -np.sin(theta)
    rot[:, 2, 1], rot[:, 2, 2] = np.sin(theta), np.cos(theta)
    hue = _YIQ_INV @ rot @ _YIQ
    m = hue @ sat @ bc
    # contrast: x -> c*x + (1-c)*128; saturation and hue map grey to grey, so the offset passes through
    t = ((1 - p.contrast) * MID_GREY)[:, None] * np.ones((b, 3))
    return np.concatenate([m, t[:, :, None]], axis=2).astype(np.float32)


def blur_kernels(sigma: np.ndarray) -> list[np.ndarray]:
    """Normalised 1-D Gaussian per sample, radius ceil(3 sigma) (as DALI); [1.0] when sigma is 0."""
    out = []
    for s in sigma.tolist():
        if s <= 0:
            out.append(np.ones(1, np.float32))
            continue
        x = np.arange(-math.ceil(3 * s), math.ceil(3 * s) + 1, dtype=np.float64)
        k = np.exp(-0.5 * (x / s) ** 2)
        out.append((k / k.sum()).astype(np.float32))
    return out


def random_resized_crop(rng: np.random.Generator, heights: np.ndarray, widths: np.ndarray,
                        scale: tuple[float, float], ratio: tuple[float, float]) -> np.ndarray:
    """torchvision's RandomResizedCrop.get_params, vectorised: int64 [B, 4] = (top, left, h, w)."""
    h_img, w_img = heights.astype(np.float64), widths.astype(np.float64)
    b = len(heights)
    area = h_img * w_img
    target = area[:, None] * rng.uniform(scale[0], scale[1], (b, CROP_ATTEMPTS))
    aspect = np.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1]), (b, CROP_ATTEMPTS)))
    w = np.rint(np.sqrt(target * aspect))
    h = np.rint(np.sqrt(target / aspect))
    fits = (w > 0) & (h > 0) & (w <= w_img[:, None]) & (h <= h_img[:, None])
    first = fits.argmax(axis=1)
    ok = fits[np.arange(b), first]
    h, w = h[np.arange(b), first], w[np.arange(b), first]
    # positions: uniform integers in [0, H - h] (drawn for every row to keep the stream aligned)
    u_top, u_left = rng.random(b), rng.random(b)
    top = np.floor(u_top * (h_img - h + 1))
    left = np.floor(u_left * (w_img - w + 1))
    # fallback: the whole image clamped to the ratio range, centred
    in_ratio = w_img / h_img
    fw = np.where(in_ratio < ratio[0], w_img, np.where(in_ratio > ratio[1], np.rint(h_img * ratio[1]), w_img))
    fh = np.where(in_ratio < ratio[0], np.rint(w_img / ratio[0]), h_img)
    ftop, fleft = np.floor((h_img - fh) / 2), np.floor((w_img - fw) / 2)
    out = np.stack([np.where(ok, top, ftop), np.where(ok, left, fleft), np.where(ok, h, fh), np.where(ok, w, fw)], 1)
    return out.astype(np.int64)


def sample_view(rng: np.random.Generator, heights: np.ndarray, widths: np.ndarray,
                recipe: AugmentationRecipe, ssl: bool) -> ViewParams:
    """The CLIP view (ssl=False: crop, and a flip with `clip_flip_prob`) or one SimCLR view (crop,
    jitter, grey, blur, flip)."""
    b = len(heights)
    crop = random_resized_crop(rng, heights, widths, recipe.ssl_scale if ssl else recipe.clip_scale, recipe.ratio)
    y0, x0 = crop[:, 0] / heights, crop[:, 1] / widths
    y1, x1 = (crop[:, 0] + crop[:, 2]) / heights, (crop[:, 1] + crop[:, 3]) / widths
    ones, zeros, no = np.ones(b, np.float32), np.zeros(b, np.float32), np.zeros(b, bool)
    if not ssl:
        # a flip is drawn only when asked for (finetuning), so pretraining's stream is unchanged
        flip = rng.random(b) < recipe.clip_flip_prob if recipe.clip_flip_prob > 0 else no
        start = np.stack([y0, np.where(flip, x1, x0)], 1).astype(np.float32)
        end = np.stack([y1, np.where(flip, x0, x1)], 1).astype(np.float32)
        return ViewParams(start, end, ones, contrast=ones, saturation=ones, hue=zeros, blur_sigma=zeros,
                          flip=flip, jitter=no, gray=no)
    r = recipe
    jitter = rng.random(b) < r.jitter_prob
    bright = rng.uniform(max(0.0, 1 - r.brightness), 1 + r.brightness, b)
    contrast = rng.uniform(max(0.0, 1 - r.contrast), 1 + r.contrast, b)
    sat = rng.uniform(max(0.0, 1 - r.saturation), 1 + r.saturation, b)
    hue = rng.uniform(-r.hue, r.hue, b) * 360.0
    gray = rng.random(b) < r.grayscale_prob
    blur = rng.random(b) < r.blur_prob
    sigma = rng.uniform(r.blur_sigma[0], r.blur_sigma[1], b)
    flip = rng.random(b) < r.flip_prob
    f32 = lambda a: np.asarray(a, np.float32)
    start = np.stack([y0, np.where(flip, x1, x0)], 1)
    end = np.stack([y1, np.where(flip, x0, x1)], 1)
    return ViewParams(f32(start), f32(end),
                      brightness=f32(np.where(jitter, bright, 1.0)),
                      contrast=f32(np.where(jitter, contrast, 1.0)),
                      saturation=f32(np.where(jitter, sat, 1.0) * ~gray),
                      hue=f32(np.where(jitter, hue, 0.0)),
                      blur_sigma=f32(np.where(blur, sigma, 0.0)),
                      flip=flip, jitter=jitter, gray=gray)


def view_names(recipe: AugmentationRecipe) -> list[str]:
    """The views of each sample, in the order they are drawn and output."""
    return ["clip_image"] + [f"ssl_image_{v}" for v in range(1, recipe.num_ssl_views + 1)]


def sample_views(rng: np.random.Generator, heights: np.ndarray, widths: np.ndarray,
                 recipe: AugmentationRecipe) -> dict[str, ViewParams]:
    """Every view of a batch, by name: the CLIP view, then each SimCLR view, drawn in that order."""
    return {name: sample_view(rng, heights, widths, recipe, ssl=name != "clip_image") for name in view_names(recipe)}
