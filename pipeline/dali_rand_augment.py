"""RandAugment on the DALI graph, fed with the loader's draws (pipeline/rand_augment.py).

DALI's own `auto_aug.rand_augment` cannot be used: it draws its randomness inside the graph (no
exact resume, no agreement with the pillow path), needs conditionals, applies every chosen operation
and has no magnitude noise. Its building blocks can: here each of the `num_ops` slots of an image
runs every operation family with per-sample parameters that make all but the drawn one an exact
identity, so the graph needs no conditionals and the operations compose in the drawn order:

| family | parameter (identity) | operations |
| --- | --- | --- |
| affine warp, bicubic, mean fill | 2x3 matrix (identity) | Rotate, ShearX/Y, TranslateX/YRel |
| blend with a degenerate image | factor (1) and which image | Brightness (black), Color (grey), Contrast (mean grey) |
| blend with the 3x3 smoothed image | factor (1) | Sharpness |
| quantise | step 2^(8 - bits) (1) | Posterize |
| invert above a threshold | threshold (256) | Solarize, Invert (threshold 0) |
| add below 128 | amount (0) | SolarizeAdd |
| per-channel stretch | on/off (off) | AutoContrast |
| histogram equalisation | on/off (off) | Equalize |

Every family rounds to whole levels as PIL does on 8-bit images (blends truncate). DALI's affine
warp has no bicubic mode, so the geometric operations interpolate bilinearly here (bicubic in timm).
The matrices are PIL's own (`Image.rotate` is an affine transform about the centre), so both paths
warp alike; the remaining differences are the warp's interpolation and Equalize, whose DALI
operator follows OpenCV's formula rather than PIL's (tests/test_rand_augment_paths.py measures the
agreement per operation).
"""
from __future__ import annotations

import math

import numpy as np

from pipeline.rand_augment import OPS, RandAugmentDraw

_GEOMETRIC = ("Rotate", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel")
_ENHANCE = ("BrightnessIncreasing", "ColorIncreasing", "ContrastIncreasing")
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], np.float32) / 13     # PIL's ImageFilter.SMOOTH
SLOT_INPUTS = ("affine", "enhance_weights", "enhance_factor", "sharpness", "posterize_step", "solarize_at",
               "solarize_add", "autocontrast", "equalize")


def affine_matrix(name: str, arg: float, size: int) -> np.ndarray:
    """The 2x3 output-to-input matrix PIL uses for operation `name` on a size x size image."""
    if name == "ShearX":
        return np.array([[1, arg, 0], [0, 1, 0]], np.float64)
    if name == "ShearY":
        return np.array([[1, 0, 0], [arg, 1, 0]], np.float64)
    if name == "TranslateXRel":
        return np.array([[1, 0, arg * size], [0, 1, 0]], np.float64)
    if name == "TranslateYRel":
        return np.array([[1, 0, 0], [0, 1, arg * size]], np.float64)
    if name == "Rotate":     # Image.rotate: about the centre, counter-clockwise for a positive angle
        a = -math.radians(arg % 360.0)
        c, s = round(math.cos(a), 15), round(math.sin(a), 15)
        centre = size / 2
        return np.array([[c, s, c * -centre + s * -centre + centre],
                         [-s, c, -s * -centre + c * -centre + centre]], np.float64)
    return np.array([[1, 0, 0], [0, 1, 0]], np.float64)


def slot_inputs(draw: RandAugmentDraw, slot: int, size: int) -> dict[str, list[np.ndarray]]:
    """Per-sample operands of one slot, by name (SLOT_INPUTS), as DALI's external source takes them."""
    b = len(draw.op)
    out = {name: [] for name in SLOT_INPUTS}
    for i in range(b):
        name = OPS[draw.op[i, slot]] if draw.apply[i, slot] else None
        arg = float(draw.argument[i, slot])
        f32 = lambda v: np.array(v, np.float32)  # noqa: E731
        out["affine"].append(f32(affine_matrix(name, arg, size) if name in _GEOMETRIC else affine_matrix("", 0, size)))
        weights = np.zeros(2, np.float32)        # (grey image, mean grey); black when both are 0
        if name == "ColorIncreasing":
            weights[0] = 1
        elif name == "ContrastIncreasing":
            weights[1] = 1
        out["enhance_weights"].append(weights)
        out["enhance_factor"].append(f32(arg if name in _ENHANCE else 1.0))
        out["sharpness"].append(f32(arg if name == "SharpnessIncreasing" else 1.0))
        bits = int(arg) if name == "PosterizeIncreasing" else 8
        out["posterize_step"].append(f32(2.0 ** (8 - min(8, bits))))
        out["solarize_at"].append(f32(arg if name == "SolarizeIncreasing" else 0.0 if name == "Invert" else 256.0))
        out["solarize_add"].append(f32(arg if name == "SolarizeAdd" else 0.0))
        out["autocontrast"].append(f32(1.0 if name == "AutoContrast" else 0.0))
        out["equalize"].append(f32(1.0 if name == "Equalize" else 0.0))
    return out


def input_names(num_ops: int) -> list[str]:
    return [f"ra{s}_{name}" for s in range(num_ops) for name in SLOT_INPUTS]


def graph_inputs(draw: RandAugmentDraw, size: int) -> dict[str, list[np.ndarray]]:
    values = {}
    for s in range(draw.op.shape[1]):
        values.update({f"ra{s}_{k}": v for k, v in slot_inputs(draw, s, size).items()})
    return values


def apply_graph(x, inputs: dict, num_ops: int, size: int, fill: tuple[int, int, int]):
    """The drawn operations on `x` (float HWC, 0-255) inside a DALI graph; `inputs` maps the names
    of `input_names(num_ops)` to external-source outputs."""
    from nvidia.dali import fn, math as dmath, types

    fill_c = np.array(fill, np.float32)
    interior = np.zeros((size, size, 1), np.float32)
    interior[1:-1, 1:-1] = 1       # PIL's 3x3 filters leave the border pixels as they are
    whole = lambda v: dmath.clamp(dmath.floor(v + 0.5), 0.0, 255.0)   # noqa: E731  round to a level
    blend = lambda v: dmath.floor(dmath.clamp(v, 0.0, 255.0))         # noqa: E731  PIL's blend truncates
    on_gpu = getattr(x, "device", "cpu") == "gpu"
    interior = types.Constant(interior, device="gpu" if on_gpu else "cpu")
    for s in range(num_ops):
        # per-sample operands come from the (CPU) external source: arithmetic with GPU data needs
        # them on the GPU; the warp's matrix is an argument input and stays on the CPU
        p = {name: inputs[f"ra{s}_{name}"].gpu() if on_gpu and name != "affine" else inputs[f"ra{s}_{name}"]
             for name in SLOT_INPUTS}
        # warp the image minus the fill colour with zero fill: outside the source is then the fill colour
        x = whole(fn.warp_affine(x - fill_c, matrix=p["affine"], fill_value=0.0, interp_type=types.INTERP_LINEAR,
                                 size=[size, size]) + fill_c)
        grey = fn.expand_dims(x[:, :, 0] * 0.299 + x[:, :, 1] * 0.587 + x[:, :, 2] * 0.114, axes=[2])
        grey = whole(grey)
        weights = p["enhance_weights"]
        degenerate = grey * weights[0] + whole(fn.reductions.mean(grey)) * weights[1]
        x = blend(degenerate + p["enhance_factor"] * (x - degenerate))
        smooth = whole(fn.filter(x, types.Constant(_SMOOTH), border="clamp"))
        smooth = smooth * interior + x * (1.0 - interior)
        x = blend(smooth + p["sharpness"] * (x - smooth))
        x = dmath.floor(x / p["posterize_step"]) * p["posterize_step"]
        x = x + fn.cast(x >= p["solarize_at"], dtype=types.FLOAT) * (255.0 - 2.0 * x)
        x = x + fn.cast(x < 128.0, dtype=types.FLOAT) * dmath.min(p["solarize_add"], 255.0 - x)
        lo, hi = fn.reductions.min(x, axes=[0, 1]), fn.reductions.max(x, axes=[0, 1])
        stretched = dmath.clamp(dmath.floor((x - lo) * (255.0 / dmath.max(hi - lo, 1.0))), 0.0, 255.0)
        on = p["autocontrast"] * fn.cast(hi > lo, dtype=types.FLOAT)
        x = x + on * (stretched - x)
        equalised = fn.cast(fn.equalize(fn.cast(x, dtype=types.UINT8)), dtype=types.FLOAT)
        x = x + p["equalize"] * (equalised - x)
    return x
