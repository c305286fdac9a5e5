"""Evaluation test data written as published: CLIP-benchmark webdataset folders (WebP and JPEG
members, nshards.txt, `{c}` templates) and ImageFolder directories."""
import io
import tarfile
from pathlib import Path

import cv2
import numpy as np


def member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def encoded(label: int, seed: int, ext: str) -> bytes:
    """A small image whose colour channel `label % 3` is bright."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (40, 48, 3), dtype=np.uint8)
    img[:, :, label % 3] += 150
    flags = [cv2.IMWRITE_WEBP_QUALITY, 101] if ext == "webp" else []      # 101: lossless, the benchmark's
    ok, buf = cv2.imencode(f".{ext}", img, flags)
    assert ok
    return buf.tobytes()


def write_split(root: Path, split: str, shards: int, per_shard: int, num_classes: int = 3) -> None:
    """`{split}/0.tar ...` (members alternate webp and jpg; sample k has label k % num_classes) and nshards.txt."""
    (root / split).mkdir(parents=True)
    k = 0
    for s in range(shards):
        with tarfile.open(root / split / f"{s}.tar", "w") as tar:
            for _ in range(per_shard):
                ext = "webp" if k % 2 == 0 else "jpg"
                member(tar, f"s{k:07d}.{ext}", encoded(k % num_classes, k, ext))
                member(tar, f"s{k:07d}.cls", str(k % num_classes).encode())
                k += 1
    (root / split / "nshards.txt").write_text(f"{shards}\n")


def write_clip_benchmark(root: Path, classes: list[str], test=(2, 9), train=(1, 12),
                         templates=("a photo of a {c}.", "a blurry photo of a {c}.")) -> Path:
    """A CLIP-benchmark classification folder; `train=None`: no train split."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "classnames.txt").write_text("\n".join(classes) + "\n")
    (root / "zeroshot_classification_templates.txt").write_text("\n".join(templates) + "\n")
    write_split(root, "test", *test, num_classes=len(classes))
    if train:
        write_split(root, "train", *train, num_classes=len(classes))
    return root


def write_image_folder(root: Path, folders: list[str], per_class: int = 3) -> Path:
    """`<root>/<folder>/<k>.jpg`: image k of folder i is sample i * per_class + k of `encoded`."""
    for i, folder in enumerate(folders):
        (root / folder).mkdir(parents=True)
        for k in range(per_class):
            (root / folder / f"{k}.jpg").write_bytes(encoded(i, 1000 + i * per_class + k, "jpg"))
    return root


def write_clip_benchmark_retrieval(root: Path, images: int = 6, captions_per_image: int = 2) -> Path:
    """A CLIP-benchmark retrieval folder: dataset_type.txt, test/0.tar with an image (webp and jpg
    alternating) and a `txt` of captions, one a line, per sample."""
    (root / "test").mkdir(parents=True)
    (root / "dataset_type.txt").write_text("retrieval\n")
    with tarfile.open(root / "test" / "0.tar", "w") as tar:
        for k in range(images):
            ext = "webp" if k % 2 == 0 else "jpg"
            member(tar, f"s{k:07d}.{ext}", encoded(k, k, ext))
            caps = [f"picture {k} caption {j}" for j in range(captions_per_image)]
            member(tar, f"s{k:07d}.txt", "\n".join(caps).encode())
    (root / "test" / "nshards.txt").write_text("1\n")
    return root
