"""The SLIP reference's data path, rebuilt as the benchmark baseline (not a training path).

The reference decodes every image with PIL and applies torchvision transforms in DataLoader
workers. torchvision does not install beside the pinned torch here, so its PIL code paths are
reproduced operation for operation (RandomResizedCrop = crop + bilinear resize; ColorJitter =
ImageEnhance brightness / contrast / colour and an HSV hue shift in random order; grayscale via
"L"; MoCo's GaussianBlur = PIL's GaussianBlur(radius=sigma); ToTensor; Normalize). It reads the
same webdataset shards as our loader, so tools/bench/bench_pipeline.py compares like with like.
"""
from __future__ import annotations

import io
import math
import random
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageFilter

from pipeline.manifest import Manifest
from pipeline.recipe import AugmentationRecipe


class ReferenceTransforms:
    """One CLIP view and `num_ssl_views` SimCLR views of a PIL image, torchvision semantics."""

    def __init__(self, recipe: AugmentationRecipe, seed: int = 0):
        self.r = recipe
        self.rnd = random.Random(seed)
        self.mean = torch.tensor(recipe.mean).view(3, 1, 1)
        self.std = torch.tensor(recipe.std).view(3, 1, 1)

    def resized_crop(self, img: Image.Image, scale: tuple[float, float]) -> Image.Image:
        w, h = img.size
        area, rnd, ratio = w * h, self.rnd, self.r.ratio
        for _ in range(10):
            target = area * rnd.uniform(*scale)
            aspect = math.exp(rnd.uniform(math.log(ratio[0]), math.log(ratio[1])))
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                top, left = rnd.randint(0, h - ch), rnd.randint(0, w - cw)
                break
        else:
            cw, ch = w, h
            if w / h < ratio[0]:
                ch = round(w / ratio[0])
            elif w / h > ratio[1]:
                cw = round(h * ratio[1])
            top, left = (h - ch) // 2, (w - cw) // 2
        size = (self.r.image_size, self.r.image_size)
        return img.crop((left, top, left + cw, top + ch)).resize(size, Image.BILINEAR)

    def color_jitter(self, img: Image.Image) -> Image.Image:
        r, rnd = self.r, self.rnd
        ops = [lambda im: ImageEnhance.Brightness(im).enhance(rnd.uniform(max(0, 1 - r.brightness), 1 + r.brightness)),
               lambda im: ImageEnhance.Contrast(im).enhance(rnd.uniform(max(0, 1 - r.contrast), 1 + r.contrast)),
               lambda im: ImageEnhance.Color(im).enhance(rnd.uniform(max(0, 1 - r.saturation), 1 + r.saturation)),
               lambda im: adjust_hue(im, rnd.uniform(-r.hue, r.hue))]
        rnd.shuffle(ops)
        for op in ops:
            img = op(img)
        return img

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        t = torch.from_numpy(np.array(img, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        return t.float().div(255).sub_(self.mean).div_(self.std)

    def clip_view(self, img: Image.Image) -> torch.Tensor:
        return self.to_tensor(self.resized_crop(img, self.r.clip_scale))

    def ssl_view(self, img: Image.Image) -> torch.Tensor:
        r, rnd = self.r, self.rnd
        img = self.resized_crop(img, r.ssl_scale)
        if rnd.random() < r.jitter_prob:
            img = self.color_jitter(img)
        if rnd.random() < r.grayscale_prob:
            grey = np.array(img.convert("L"))
            img = Image.fromarray(np.dstack([grey] * 3), "RGB")
        if rnd.random() < r.blur_prob:
            img = img.filter(ImageFilter.GaussianBlur(radius=rnd.uniform(*r.blur_sigma)))
        if rnd.random() < r.flip_prob:
            img = img.transpose(Image.FLIP_LEFT_RIGHT)
        return self.to_tensor(img)


def adjust_hue(img: Image.Image, factor: float) -> Image.Image:
    """torchvision's PIL hue shift: rotate the H channel of HSV by factor * 255 (uint8 wrap-around)."""
    h, s, v = img.convert("HSV").split()
    np_h = np.array(h, dtype=np.uint8)
    with np.errstate(over="ignore"):
        np_h += np.array(factor * 255).astype(np.uint8)
    return Image.merge("HSV", (Image.fromarray(np_h, "L"), s, v)).convert("RGB")


class ReferenceDataset(torch.utils.data.IterableDataset):
    """Streams the manifest's tars (split between DataLoader workers), PIL decode, reference views."""

    def __init__(self, manifest: Manifest, recipe: AugmentationRecipe, tokenizer: Callable, seed: int = 0):
        self.urls = [str(p) for p in manifest.shard_paths()]
        self.recipe, self.tokenizer, self.seed = recipe, tokenizer, seed

    def __iter__(self):
        import webdataset as wds
        info = torch.utils.data.get_worker_info()
        wid = info.id if info else 0
        tf = ReferenceTransforms(self.recipe, self.seed * 1000 + wid)
        # webdataset splits the shards between DataLoader workers (its default split_by_worker)
        for sample in wds.WebDataset(self.urls, shardshuffle=False):
            data = next((sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
            if data is None:
                continue
            img = Image.open(io.BytesIO(data)).convert("RGB")
            views = [tf.clip_view(img)] + [tf.ssl_view(img) for _ in range(self.recipe.num_ssl_views)]
            caption = sample.get("txt", b"").decode("utf-8", "replace")
            yield (*views, self.tokenizer([caption])[0])


def reference_loader(manifest: Manifest, recipe: AugmentationRecipe, batch_size: int, tokenizer: Callable,
                     num_workers: int = 2, seed: int = 0) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(ReferenceDataset(manifest, recipe, tokenizer, seed), batch_size=batch_size,
                                       num_workers=num_workers, persistent_workers=num_workers > 0,
                                       prefetch_factor=4 if num_workers else None)
