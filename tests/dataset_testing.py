"""Shard sets in the layouts people already have, for the data-source tests (index_shards, mixtures)."""
from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from test_trainer import COLORS, SHAPES, _image


def add_member(tar: tarfile.TarFile, name: str, data: bytes | str) -> None:
    data = data.encode() if isinstance(data, str) else data
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def caption_of(i: int) -> str:
    names = list(COLORS)
    return f"a {names[i % 4]} {SHAPES[i // 4 % 8]}"


def image_of(i: int, fmt: str = "JPEG") -> bytes:
    data = _image(COLORS[list(COLORS)[i % 4]], i // 4 % 8)
    if fmt == "JPEG":
        return data
    if fmt == "WEBP":             # this Pillow has no WebP codec; OpenCV writes one
        import cv2
        import numpy as np
        from PIL import Image
        rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
        return cv2.imencode(".webp", rgb[:, :, ::-1])[1].tobytes()
    from PIL import Image
    buf = io.BytesIO()
    Image.open(io.BytesIO(data)).save(buf, fmt)
    return buf.getvalue()


def img2dataset_shard(folder: Path, shard: int, samples: list[dict]) -> Path:
    """`NNNNN.tar` with key.jpg / key.txt / key.json members as img2dataset writes them, and its
    `NNNNN_stats.json` and `NNNNN.parquet` beside it. A sample is {"key", "image": (ext, bytes) or
    None, "caption": str or None}."""
    folder.mkdir(parents=True, exist_ok=True)
    tar_path = folder / f"{shard:05d}.tar"
    with tarfile.open(tar_path, "w") as tar:
        for s in samples:
            if s.get("image") is not None:
                add_member(tar, f"{s['key']}.{s['image'][0]}", s["image"][1])
            if s.get("caption") is not None:
                add_member(tar, f"{s['key']}.txt", s["caption"])
            meta = {"key": s["key"], "status": "success", "url": f"http://example.com/{s['key']}.jpg"}
            if s.get("caption") is not None:
                meta["caption"] = s["caption"]
            add_member(tar, f"{s['key']}.json", json.dumps(meta))
    (folder / f"{shard:05d}_stats.json").write_text(json.dumps({"count": len(samples), "successes": len(samples)}))
    pq.write_table(pa.table({"key": [s["key"] for s in samples], "status": ["success"] * len(samples)}),
                   folder / f"{shard:05d}.parquet")
    return tar_path


def good(i: int, shard: int = 0, fmt: tuple[str, str] = ("jpg", "JPEG")) -> dict:
    return {"key": f"{shard:05d}{i:04d}", "image": (fmt[0], image_of(i, fmt[1])), "caption": caption_of(i)}
