"""Encoded image bytes to a PIL image, WebP included.

The pillow-simd that `make setup` builds has no WebP codec (`PIL.features.check("webp")` is False),
yet img2dataset can write WebP and the CLIP benchmark publishes its shards in WebP. The PIL decoders
of samples (the pillow augmenter, the scan that names a failed batch's bad samples, evaluation,
finetuning's validation, previews) open images here, and WebP goes through OpenCV (installed with
img2dataset) when PIL cannot read it. DALI decodes WebP itself. The builder's own check
(`pipeline/verify.py`) reads the JPEGs it writes; `pipeline/indexing.py` handles WebP headers itself.
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, features

from pipeline.webp_header import is_webp

WEBP_IN_PIL = features.check("webp")


def _decode_webp(data: bytes) -> Image.Image:
    import cv2
    pixels = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)   # alpha dropped, as convert("RGB")
    if pixels is None:
        raise ValueError("undecodable WebP image")
    return Image.fromarray(cv2.cvtColor(pixels, cv2.COLOR_BGR2RGB))


def open_image(data, load: bool = True) -> Image.Image:
    """The image in `data`. With `load` (the default) it is fully decoded here, so a truncated file
    fails now; `load=False` leaves a PIL-readable image lazy (for `draft` before decoding a JPEG)."""
    if is_webp(data) and not WEBP_IN_PIL:
        return _decode_webp(data)
    img = Image.open(io.BytesIO(data))
    if load:
        img.load()
    return img
