"""The first demo data: colour x shape classes with clean captions (`--demo-design colour`).

`make demo`'s first default. Its classes are colour x shape, so colour defines half of each class
and every caption names the class exactly: two properties YFCC15M lacks and SLIP's SimCLR views
work against. demokit/data.py holds the designs that remove both (`groups`, the default, and
`structure`) and docs/DEMO.md what the demo measured on each. The configuration object is
demokit.data.DemoDataConfig; this module only draws images and captions.

Images: one coloured shape (4 colours x 4 shapes = 16 classes) at a random place, size and rotation,
on a muted random background with a gradient and clutter, JPEGs of varied sizes and aspect ratios.
Captions name colour and shape in many phrasings among distractor words, URL-encoded like the
real metadata, sometimes with HTML, URLs, newlines and entities that the cleaning removes.
A few rows exercise every bad-input rule (video, not in subset, malformed, non-UTF-8, no caption,
non-http URL, missing image -> HTTP 404, duplicate and missing subset ids).
"""
from __future__ import annotations

import io
import json
import math
import random
from dataclasses import asdict
from multiprocessing import Pool
from pathlib import Path
from urllib.parse import quote_plus

from PIL import Image, ImageDraw

from demokit.data import MIRROR_PATH, _meta_row, demo_url_template, write_inputs  # noqa: F401  (one format)
from pipeline.metadata import url_hash

COLORS = {"red": (215, 35, 35), "green": (35, 160, 50), "blue": (35, 70, 215), "yellow": (235, 205, 25)}
SHAPES = ("circle", "square", "triangle", "star")
CLASSNAMES = sorted(f"{c} {s}" for c in COLORS for s in SHAPES)     # sorted = ImageFolder label order
TEMPLATES = ["a photo of a {}.", "a {}.", "a picture of the {}.", "a drawing of a {}.", "my {}.",
             "a {} on a background."]
BACKGROUNDS = ("grey", "beige", "dark", "pale", "dusty", "stone")
DISTRACTORS = ("taken yesterday", "nice light", "from my trip", "at the park", "on the weekend", "(explored)",
               "shot with a phone", "in the morning", "near the old town", "for the album")
TITLES = ("{color} {shape}", "A {color} {shape}", "my {color} {shape}", "{Shape}, {color}",
          "{color} {shape} {d}", "the {shape} ({color})")
DESCRIPTIONS = ("a photo of a {color} {shape} on a {bg} background", "Found this {color} {shape} {d}.",
                "{color} {shape}, {d}", "A {shape} painted {color}. {d}", "just a {color} {shape}",
                "Look at the {color} {shape} {d}!")


def _shape_points(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        n, radii = 4, [r] * 4
    elif shape == "triangle":
        n, radii = 3, [r * 1.15] * 3
    else:  # star
        n, radii = 10, [r * 1.15 if i % 2 == 0 else r * 0.48 for i in range(10)]
    return [(cx + radii[i] * math.cos(rot + 2 * math.pi * i / n), cy + radii[i] * math.sin(rot + 2 * math.pi * i / n))
            for i in range(n)]


def draw(color: str, shape: str, w: int, h: int, seed: int) -> bytes:
    """One JPEG: a `color` `shape` on a muted, cluttered background."""
    rnd = random.Random(seed)
    base = [rnd.randint(70, 190)] * 3
    tint = [min(255, max(0, v + rnd.randint(-15, 15))) for v in base]   # muted: never a class colour
    img = Image.new("RGB", (w, h), tuple(tint))
    d = ImageDraw.Draw(img)
    slope = rnd.uniform(-40, 40)
    for y in range(0, h, 8):   # vertical gradient
        f = y / h * slope
        d.rectangle([0, y, w, y + 8], fill=tuple(int(max(0, min(255, v + f))) for v in tint))
    for _ in range(rnd.randint(2, 6)):   # grey clutter
        x, y, s = rnd.randrange(w), rnd.randrange(h), rnd.randint(4, max(5, min(w, h) // 8))
        g = rnd.randint(40, 220)
        d.rectangle([x, y, x + s, y + s // 2], fill=(g, g, g))
    r = rnd.uniform(0.2, 0.35) * min(w, h)
    cx, cy = rnd.uniform(r, w - r), rnd.uniform(r, h - r)
    fill = tuple(max(0, min(255, v + rnd.randint(-25, 25))) for v in COLORS[color])
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    else:
        d.polygon(_shape_points(shape, cx, cy, r, rnd.uniform(0, 2 * math.pi)), fill=fill)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=rnd.randint(80, 95))
    return buf.getvalue()


def _size(rnd: random.Random) -> tuple[int, int]:
    short, aspect = rnd.randint(96, 300), rnd.uniform(0.6, 1.8)
    return (int(short * aspect), short) if aspect >= 1 else (short, int(short / aspect))


def _write_image(job: tuple[str, str, str, int, int, int]) -> None:
    path, color, shape, w, h, seed = job
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(draw(color, shape, w, h, seed))


def _captions(rnd: random.Random, color: str, shape: str) -> tuple[str, str]:
    """Raw (URL-encoded) title and description, sometimes with noise the cleaning must remove."""
    kw = dict(color=color, shape=shape, Shape=shape.capitalize(), d=rnd.choice(DISTRACTORS), bg=rnd.choice(BACKGROUNDS))
    title, desc = rnd.choice(TITLES).format(**kw), rnd.choice(DESCRIPTIONS).format(**kw)
    noise = rnd.random()
    if noise < 0.1:
        desc = f"<b>{desc}</b> more at http://www.flickr.com/photos/demo/{rnd.randint(1, 99999)}"
    elif noise < 0.2:
        desc = f'{desc}\n\n<a href="http://example.com/x">my site</a> www.example.com'
    elif noise < 0.25:
        desc = desc.replace("a ", "a &amp; ", 1)
    which = rnd.random()
    if which < 0.15:
        title = ""
    elif which < 0.3:
        desc = ""
    return quote_plus(title), quote_plus(desc)


def generate(cfg) -> tuple[Path, Path]:
    """Write DIR/source (metadata, subset, images) and DIR/eval. Returns (metadata, subset) paths.
    Skipped when DIR/source/done.json records the same settings."""
    out = Path(cfg.out)
    src, ev = out / "source", out / "eval"
    done = src / "done.json"
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("out", "workers", "noisy_captions")}
    meta, subset = src / "yfcc100m_dataset.tsv", src / "yfcc100m_subset_data.tsv"
    if done.exists() and json.loads(done.read_text()) == settings:
        return meta, subset
    rnd = random.Random(cfg.seed)
    jobs, rows, sub = [], [], []
    for i in range(cfg.samples):
        pid = 10_000_000 + i * 7
        url = f"http://farm1.staticflickr.com/1/{pid}_demo.jpg"
        h = url_hash(url)
        color, shape = rnd.choice(list(COLORS)), rnd.choice(SHAPES)
        title, desc = _captions(rnd, color, shape)
        marker, in_subset, missing_image = "0", True, False
        kind = rnd.random()
        if kind < 0.01:
            marker = "1"                                  # video
        elif kind < 0.02:
            in_subset = False                             # not in subset
        elif kind < 0.025:
            title, desc = quote_plus("<b></b>"), quote_plus("http://only.a/url")   # no caption
        elif kind < 0.03:
            missing_image = True                          # HTTP 404
        if not missing_image:
            w, hh = _size(rnd)
            jobs.append((str(src / "images" / MIRROR_PATH.format(h3a=h[:3], h3b=h[3:6], h=h)), color, shape, w, hh, pid))
        rows.append(_meta_row(len(rows) + 1, pid, h, title, desc, url, marker))
        if in_subset:
            sub.append((pid, h))
    write_inputs(src, meta, subset, rows, sub)
    # held-out labelled split
    val_caps = []
    for split in ("train", "val"):
        for ci, cname in enumerate(CLASSNAMES):
            color, shape = cname.split()
            for k in range(cfg.eval_per_class):
                seed = 1_000_000 * (1 + (split == "val")) + ci * 10_000 + k + cfg.seed * 7919
                r = random.Random(seed)
                w, hh = _size(r)
                rel = f"{split}/{cname}/{k:04d}.jpg"
                jobs.append((str(ev / rel), color, shape, w, hh, seed))
                if split == "val":
                    val_caps.append({"file": rel, "caption": r.choice(DESCRIPTIONS).format(
                        color=color, shape=shape, Shape=shape.capitalize(), d=r.choice(DISTRACTORS),
                        bg=r.choice(BACKGROUNDS))})
    with Pool(cfg.workers) as pool:
        for _ in pool.imap_unordered(_write_image, jobs, chunksize=64):
            pass
    ev.mkdir(parents=True, exist_ok=True)
    (ev / "classnames.json").write_text(json.dumps(CLASSNAMES, indent=1))
    (ev / "templates.json").write_text(json.dumps(TEMPLATES, indent=1))
    (ev / "val_captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in val_caps))
    done.write_text(json.dumps(settings))
    return meta, subset


