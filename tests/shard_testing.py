"""Write small img2dataset-style webdataset shard sets (tars, DALI indexes, manifest) for the tests."""
from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.shards import write_shard_set as write_shards  # noqa: F401  (re-exported for the tests)


def encode(array: np.ndarray, fmt: str = "JPEG", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array.astype(np.uint8)).save(buf, fmt, **({"quality": quality} if fmt == "JPEG" else {}))
    return buf.getvalue()


def coordinate_image(w: int, h: int) -> np.ndarray:
    """R encodes x and G encodes y (0..255 over the image), B is constant: a crop reveals its window."""
    x = (np.arange(w) + 0.5) / w * 255
    y = (np.arange(h) + 0.5) / h * 255
    img = np.empty((h, w, 3), np.float64)
    img[..., 0] = x[None, :]
    img[..., 1] = y[:, None]
    img[..., 2] = 128
    return np.rint(img)


def chars(captions, context_length=77) -> torch.Tensor:
    """A test tokenizer the loader's outputs can be read back from: one id per character."""
    out = torch.zeros(len(captions), context_length, dtype=torch.long)
    for i, c in enumerate(captions):
        ids = [ord(ch) for ch in c][:context_length]
        out[i, :len(ids)] = torch.tensor(ids)
    return out


def caption_sample(img: np.ndarray, title: str, description: str = "", **extra) -> dict:
    meta = {"title": title, "description": description, "caption": title, **extra}
    return {"jpg": encode(img), "txt": title, "json": json.dumps(meta)}


# Both augmentation paths take the same batches from the loader; tests of what they share run on each.
both_backends = pytest.mark.parametrize("backend", ["dali", "pillow"])
