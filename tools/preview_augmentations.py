#!/usr/bin/env python
"""Contact sheets of what the loader really feeds the model.

    python tools/preview_augmentations.py --manifest demo_run/data/shards/manifest.json --out previews
    python tools/preview_augmentations.py --manifest M --out P --config trainer/configs/slip_vit_b16.yaml \\
        --num-samples 32 --html

One row per sample: the stored image, the CLIP view and both SimCLR views (un-normalised, from the
real loader, augmenter and recipe of the config), each view labelled with the crop share and the
colour, blur and flip its batch plan drew, and underneath the caption as the model reads it
(decoded tokens).
"""
from __future__ import annotations

import argparse
import html
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from pipeline.cli import report, run_main  # noqa: E402
from pipeline.image_open import open_image  # noqa: E402

TILE = 192
PAD = 8
BG = (250, 250, 250)
INK = (20, 20, 20)


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:      # Pillow < 10.1 has one bitmap size
        return ImageFont.load_default()


def to_image(view: torch.Tensor, mean, std) -> Image.Image:
    """Normalised [3, S, S] -> RGB PIL, scaled up to the tile with nearest neighbours (pixels stay visible)."""
    x = view.float().cpu() * torch.tensor(std).view(3, 1, 1) + torch.tensor(mean).view(3, 1, 1)
    arr = (x.clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
    img = Image.fromarray(np.ascontiguousarray(arr))
    return img.resize((TILE, TILE), Image.NEAREST if img.width < TILE else Image.BILINEAR)


def fit(img: Image.Image) -> Image.Image:
    img = img.convert("RGB")
    img.thumbnail((TILE, TILE))
    tile = Image.new("RGB", (TILE, TILE), BG)
    tile.paste(img, ((TILE - img.width) // 2, (TILE - img.height) // 2))
    return tile


def describe(p, i: int, ssl: bool) -> str:
    parts = [f"crop {p.crop_area_fraction()[i] * 100:.0f}%"]
    if ssl:
        if p.jitter[i]:
            parts.append(f"jitter b{p.brightness[i]:.2f} c{p.contrast[i]:.2f} h{p.hue[i]:+.0f}")
        if p.gray[i]:
            parts.append("grey")
        if p.blur_sigma[i] > 0:
            parts.append(f"blur {p.blur_sigma[i]:.1f}")
        if p.flip[i]:
            parts.append("flip")
    return ", ".join(parts)


def label_lines(d: ImageDraw.ImageDraw, label: str, f) -> list[str]:
    """Comma-separated parts packed into lines no wider than a tile."""
    lines: list[str] = []
    for part in label.split(", "):
        if lines and d.textlength(lines[-1] + ", " + part, font=f) <= TILE:
            lines[-1] += ", " + part
        else:
            lines.append(part)
    return lines


def contact_sheet(rows: list[dict], columns: list[str]) -> Image.Image:
    f_head, f_label, f_cap = font(16), font(12), font(14)
    wrap = max(20, (len(columns) * (TILE + PAD)) // 8)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_h = [14 * max(len(label_lines(measure, lb, f_label)) for lb in r["labels"]) for r in rows]
    heights = [TILE + lh + 6 + 18 * min(3, len(textwrap.wrap(r["caption"], wrap)) or 1) + PAD
               for r, lh in zip(rows, label_h)]
    width = PAD + len(columns) * (TILE + PAD)
    sheet = Image.new("RGB", (width, 28 + sum(heights)), BG)
    d = ImageDraw.Draw(sheet)
    for c, name in enumerate(columns):
        d.text((PAD + c * (TILE + PAD), 6), name, fill=INK, font=f_head)
    y = 28
    for row, h, lh in zip(rows, heights, label_h):
        for c, (tile, label) in enumerate(zip(row["tiles"], row["labels"])):
            x = PAD + c * (TILE + PAD)
            sheet.paste(tile, (x, y))
            for k, line in enumerate(label_lines(d, label, f_label)):
                d.text((x, y + TILE + 2 + 14 * k), line, fill=(90, 90, 90), font=f_label)
        lines = textwrap.wrap(row["caption"], wrap)[:3] or ["(empty caption)"]
        for k, line in enumerate(lines):
            d.text((PAD, y + TILE + lh + 6 + 18 * k), line, fill=INK, font=f_cap)
        y += h
    return sheet


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--config", help="training config whose recipe and seed to use (default: the reference recipe)")
    p.add_argument("--num-samples", type=int, default=8)
    p.add_argument("--per-sheet", type=int, default=8)
    p.add_argument("--seed", type=int, help="default: the config's train.seed")
    p.add_argument("--html", action="store_true", help="also write index.html with every sheet")
    p.add_argument("overrides", nargs="*", help="config overrides, e.g. data.recipe.image_size=128")
    args = p.parse_args(argv)

    from pipeline.loader import SLIPLoader
    from pipeline.manifest import load_manifest
    from pipeline.tokenizer import Tokenizer
    from pipeline.view_params import view_names
    from trainer.config import load_config
    cfg = load_config(args.config, args.overrides)
    recipe = cfg.data.recipe
    seed = cfg.train.seed if args.seed is None else args.seed
    try:    # an unusable manifest or shard set (ShardError is a ValueError) is one line, not a traceback
        manifest = load_manifest(args.manifest)
        n = min(args.num_samples, manifest.total_samples)
        tokenizer = Tokenizer()
        loader = SLIPLoader(manifest, recipe, n, tokenizer, seed=seed, num_threads=2,
                            caption_mode=cfg.data.caption_mode, backend=cfg.data.backend)  # the path that will train
    except ValueError as e:
        return report(e, 2)
    batch = next(iter(loader))
    params = loader.make_batch(0, 0).views       # the plan's draws behind this very batch
    views = view_names(recipe)
    columns = ["stored image", "CLIP view"] + [f"SimCLR view {v}" for v in range(1, recipe.num_ssl_views + 1)]
    rows = []
    for i, index in enumerate(batch["index"].tolist()):
        original = open_image(loader.reader.image(index))
        labels = [f"{original.width}x{original.height}"]
        labels += [describe(params[v], i, ssl=v != "clip_image") for v in views]
        tiles = [fit(original)] + [to_image(batch[v][i], recipe.mean, recipe.std) for v in views]
        rows.append({"tiles": tiles, "labels": labels, "caption": tokenizer.decode(batch["text"][i].tolist()),
                     "index": index})
    args.out.mkdir(parents=True, exist_ok=True)
    sheets = []
    for s in range(0, len(rows), args.per_sheet):
        path = args.out / f"sheet_{s // args.per_sheet:03d}.png"
        contact_sheet(rows[s:s + args.per_sheet], columns).save(path)
        sheets.append(path)
    if args.html:
        body = "\n".join(f'<h2>{html.escape(s.name)}</h2><img src="{html.escape(s.name)}">' for s in sheets)
        (args.out / "index.html").write_text(
            f"<!doctype html><meta charset=utf-8><title>augmentation previews</title>"
            f"<h1>{html.escape(str(args.manifest))}: {len(rows)} samples, {recipe.image_size}px, seed {seed}</h1>"
            f"<p>recipe: {html.escape(str(recipe))}</p>{body}\n")
    print(f"wrote {len(sheets)} sheet(s) of {len(rows)} samples to {args.out}"
          + (" (index.html)" if args.html else ""))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
