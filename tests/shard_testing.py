"""Write small img2dataset-style webdataset shard sets (tars, DALI indexes, manifest) for the tests."""
from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.manifest import Manifest, ShardEntry, save_manifest


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


def write_shards(out: Path, samples: list[dict], per_shard: int, name: str = "test", index: bool = True) -> Path:
    """samples: dicts of component -> bytes/str (e.g. jpg, txt, json); None values are left out."""
    import tarfile
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for s in range(0, len(samples), per_shard):
        tar_path = out / f"{s // per_shard:05d}.tar"
        with tarfile.open(tar_path, "w") as tar:
            for k, sample in enumerate(samples[s:s + per_shard], s):
                for ext, value in sample.items():
                    if value is None:
                        continue
                    data = value.encode() if isinstance(value, str) else value
                    info = tarfile.TarInfo(f"{k:06d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        idx = None
        if index:
            idx = tar_path.with_suffix(".idx")
            subprocess.run([str(Path(sys.executable).parent / "wds2idx"), str(tar_path), str(idx)], check=True,
                           capture_output=True)
        entries.append(ShardEntry(path=tar_path.name, samples=len(samples[s:s + per_shard]),
                                  bytes=tar_path.stat().st_size,
                                  sha256=hashlib.sha256(tar_path.read_bytes()).hexdigest(),
                                  index=idx.name if idx else None))
    manifest = out / "manifest.json"
    save_manifest(Manifest(name, str(out), entries), manifest)
    return manifest


def caption_sample(img: np.ndarray, title: str, description: str = "", **extra) -> dict:
    meta = {"title": title, "description": description, "caption": title, **extra}
    return {"jpg": encode(img), "txt": title, "json": json.dumps(meta)}
