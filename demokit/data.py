"""The demo's synthetic YFCC-format data set: classes that colour does not define, captions as noisy as Flickr's.

`make demo` builds it (`--demo-design groups`, the default). Its predecessor with one large object per
image stays available as `--demo-design structure` (rounds 2-6 in docs/NCLIP.md and the earlier
tables in docs/DEMO.md were measured on it; tests/test_build_demo.py pins its images and captions),
and the first demo data, colour x shape with exact captions, as `--demo-design colour`
(demokit/data_colour.py).

Design (decided before comparing SLIP with CLIP on it; the issue that asked for it: #23)
-----------------------------------------------------------------------------------------
Classes are defined by structure, never by colour. 16 classes = 4 patterns (plain, striped,
spotted, checkered) x 4 shapes (circle, square, triangle, star), e.g. "striped triangle". Each
image draws, independently of its class: the objects' colour and their pattern's second colour
(from 11 named colours; the pair always differs in luminance, so the pattern survives the
grayscale augmentation), the background's colour and luminance gradient, the objects' positions,
sizes and rotations, the pattern's orientation and phase, and 1-4 plain clutter items (bars, blobs,
lines), some in front of the objects. Colour alone therefore predicts nothing about the class
(tests/test_build_demo.py checks that a mean-colour classifier stays near chance), so SimCLR's
colour jitter and grayscale remove a nuisance here, as they do for ImageNet's classes.

Groups of copies (the groups design). Every image shows 2-4 copies of its class object (e.g. three
striped stars), each with its own size, rotation and pattern phase, apart from each other
(centres at least 1.1x the sum of their radii apart; a triangle's or star's tip, at 1.2 r, can
overlap a neighbour slightly). Why: SimCLR's views are crops of 8-100% of the image.
With one object of 56-80% of the short side (the structure design), a crop needs 31-64% of a square
image to hold the whole silhouette, so many of SimCLR's views show only texture; in one full demo
of that design SLIP got the pattern of a class right 68.6% of the time and the shape 27.7%
(chance 25%; docs/DEMO.md). A copy here is 30-40% of the short side across (a star's tips span
about 2.3 r), so crops from 9-16% of the image up (12-21% for a star) can hold a whole copy, and the class is carried by every part of the group, as in a
photo of a flock or a shelf of things. This design was not decided blind: it was made after the
structure design's demos and caption study had compared SLIP with CLIP and shown SLIP under its
target. It changes only the images' layout and the names' number, and was committed before any
training run on it.

Scale rule. The demo trains at 64 px on crops of 8-100% of the image (CLIP view 50-100%). The
coarsest view a model sees is about the whole short side at 64 px, where the smallest copy
(radius 15% of the short side) is 9.6 px in radius. Every pattern element is sized relative to its
copy: stripes 42-52% of the radius wide (>= 4.0 px at that coarsest view), checks 45-55% (>= 4.3
px), spots on a grid of 85-100% of the radius, 0.6 of it across (>= 4.9 px) with gaps of >= 3.3 px.
A crop may be up to 4/3 as wide as it is high (on wide images: 4/3 of the short side) and is
squeezed into 64 x 64, which shrinks one axis by up to 0.75: there stripes are >= 3.0 px, checks
>= 3.2 px, spots >= 3.7 px and the gaps between spots >= 2.4 px, the finest structure in the data.
A smaller crop only magnifies it (the preview sheets show the 64 px views; tests/test_build_demo.py
checks the rule and that the patterns' contrast survives a 64 px downscale). The structure
design's numbers: radius 28-40%, stripes 30-40%, checks 35-45%, spot grid 60-75% (`GEOMETRY`). The
objects lie within the image's central square (up to a tip, above), so the evaluation's centre crop
keeps them.

Captions are as noisy as Flickr's. Per training photo (shares chosen from what YFCC titles and
descriptions look like: many titles are the camera's file name, a date or a place; many
descriptions are empty or about something else; people name what they see loosely). YFCC15M is
OpenAI's subset of photos with English natural language in the title and/or the description, so a
title that is a file name, a date or empty always comes with a description in words:
  title:        15% camera file name (IMG_1234, DSC_0042, P1010234, ...), 5% date, 5% place name,
                5% empty, 70% names the object;
  description:  after a file-name, date or empty title: 25% unrelated text, 75% names the object;
                otherwise 40% empty, 15% unrelated, 45% names the object;
  naming text:  60% the exact class words (a third of them with the colour, "a red striped star"),
                25% a near-synonym for one or both words ("stripy disc", "chequered tile"),
                15% only part of the object ("a star", "polka dots");
  markup:       as in YFCC, 10% of descriptions in <b> with a trailing link, 10% with a newline and
                an <a> link, 5% with an HTML entity, all URL-encoded; the cleaning removes them.
The trainer takes the title or the description at random (whichever are non-empty), so about 76%
of training captions name the object in some way and about 44% name the full class exactly
(measured over 20,000 draws): the language supervision is partial and noisy, as on YFCC15M. (The
first shares, 64% and 33%, ignored the subset's natural-language rule; with them not even clean
images were learned within the demo's budget: docs/DEMO.md.)
`noisy_captions=False` (`--demo-clean-captions`) makes every title and description name the class
exactly, with the same images: the control of the caption-noise study (docs/DEMO.md). The evaluation captions (the
retrieval ground truth in eval/val_captions.jsonl) stay clean: class words and colour. In the groups
design every name is plural ("red striped stars", "stripy discs", "stars"), as people caption a
picture of several things.

Zero-shot uses the class names as a user would type them ("striped circle", "checkered star")
in everyday prompts for a picture of several ("a photo of {}s.", "a group of {}s.", ...; the
structure design: "a photo of a {}.", "a {} shape.", ...); the near-synonyms never appear there.
The text set (`text_set`) keeps singular names in both designs.

Images: JPEGs of varied sizes (short side 96-300 px) and aspect ratios (0.6-1.8).

Layout (docs/ARCHITECTURE.md "Demo data"):
  DIR/source/   yfcc100m_dataset.tsv, yfcc100m_subset_data.tsv, images/ (served over loopback HTTP)
  DIR/shards/   the built shards + manifest.json
  DIR/eval/     {train,val}/<class name>/*.jpg, classnames.json, templates.json, val_captions.jsonl
  DIR/eval_ood/ val/<class name>/*.jpg, classnames.json, templates.json: the out-of-domain set
  DIR/eval_text/ sts.tsv (sentence1, sentence2, score), sst/{train,dev}.tsv (sentence, label)

Out-of-domain set (`render_sketch`): the same 16 classes, laid out as in the design, as line
drawings on plain paper: each object's outline and its pattern's edges in one dark ink, no fill, colour or clutter; up to
OOD_PER_CLASS images a class. The demo scores it zero-shot only (trainer/configs/eval/demo.yaml).
Text set (`text_set`): STS pairs graded 0-5 and labelled sentences from the caption grammar, for
the text tower alone.

A few rows exercise every bad-input rule (video, not in subset, malformed, non-UTF-8, no caption,
non-http URL, missing image -> HTTP 404, duplicate and missing subset ids).
"""
from __future__ import annotations

import io
import json
import math
import random
from dataclasses import asdict, dataclass
from multiprocessing import Pool
from pathlib import Path
from urllib.parse import quote_plus

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.metadata import url_hash

PATTERNS = ("plain", "striped", "spotted", "checkered")
SHAPES = ("circle", "square", "triangle", "star")
CLASSNAMES = sorted(f"{p} {s}" for p in PATTERNS for s in SHAPES)     # sorted = ImageFolder label order
# zero-shot prompts per design, as a user would write them for what the images show
TEMPLATES = {"structure": ["a photo of a {}.", "a picture of a {}.", "a {}.", "a {} shape.", "a drawing of a {}.",
                           "a photo of the {}."],
             "groups": ["a photo of {}s.", "a picture of some {}s.", "{}s.", "a group of {}s.", "a drawing of {}s.",
                        "a photo of a few {}s."]}
# named colours for objects and patterns; the names appear in some captions (a nuisance word)
COLORS = {"red": (210, 40, 40), "orange": (240, 140, 30), "yellow": (235, 210, 40), "green": (40, 160, 60),
          "teal": (30, 150, 150), "blue": (40, 80, 210), "purple": (130, 50, 170), "pink": (240, 140, 180),
          "brown": (120, 75, 40), "white": (240, 240, 235), "black": (25, 25, 30)}
MIN_PATTERN_CONTRAST = 70      # luminance difference of an object's two colours
MIN_BACKGROUND_CONTRAST = 40   # luminance difference of the object's mean and the background
CLUTTER = (1, 4)               # plain clutter items per image


@dataclass(frozen=True)
class Geometry:
    """How a design draws its objects: radii as a share of the image's short side, pattern elements as
    a share of the object's radius (the scale rule in the module docstring)."""
    radius: tuple[float, float]
    copies: tuple[int, int]         # copies of the class object in one image
    stripe: tuple[float, float]     # stripe width
    check: tuple[float, float]      # check cell
    spot_spacing: tuple[float, float]   # spot grid spacing; dots are 0.6 of it across

    @property
    def plural(self) -> bool:
        """Several copies per image: captions and prompts name them in the plural."""
        return self.copies[1] > 1


GEOMETRY = {"structure": Geometry((0.28, 0.40), (1, 1), (0.30, 0.40), (0.35, 0.45), (0.60, 0.75)),
            "groups": Geometry((0.15, 0.20), (2, 4), (0.42, 0.52), (0.45, 0.55), (0.85, 1.00))}
DEFAULT_DESIGN = "groups"

SYNONYMS = {"plain": ("solid", "plain-coloured", "single-colour"), "striped": ("stripy", "banded", "stripe-patterned"),
            "spotted": ("dotted", "polka-dot", "spotty"), "checkered": ("chequered", "checked", "chessboard"),
            "circle": ("disc", "round shape", "ring"), "square": ("tile", "block", "box"),
            "triangle": ("wedge", "pyramid", "triangular sign"), "star": ("starburst", "star shape", "asterisk")}
PARTS = {"plain": (), "striped": ("stripes", "lines"), "spotted": ("dots", "polka dots", "spots"),
         "checkered": ("checks", "a checkerboard", "squares pattern")}
NAMING = ("{name}", "A {name}", "my {name}", "the {name} {d}", "{Name}!", "{name}, {d}", "Look at this {name}",
          "a {name} I found {d}", "{name} on the wall", "just a {name}")
NAMING_PLURAL = ("{name}", "some {name}", "my {name}", "the {name} {d}", "{Name}!", "{name}, {d}",
                 "Look at these {name}", "{name} I found {d}", "{name} on the wall", "just {name}")
CAMERA_NAMES = ("IMG_{n4}", "DSC_{n4}", "DSCN{n4}", "P10{n5}", "_MG_{n4}", "IMG_{n4}.JPG", "DSC{n5}", "100_{n4}")
DATES = ("{y}-{m:02d}-{dd:02d}", "{dd:02d}.{m:02d}.{y}", "{month} {dd}, {y}", "{month} {y}", "Summer {y}")
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")
PLACES = ("Berlin", "Lake Tahoe", "Kyoto", "Brighton Pier", "Grand Canyon", "Paris, France", "Central Park",
          "Lisbon 2011", "Route 66", "Edinburgh", "Yosemite", "Barcelona", "Cape Town", "Oslo harbour")
UNRELATED = ("Had a great day out with the family.", "Uploaded from my phone", "All rights reserved.",
             "Thanks for all the comments!", "Testing my new lens", "More in my set.", "Taken on a rainy afternoon.",
             "Happy birthday, mum!", "Best viewed large", "from the archive", "We walked for hours.",
             "No edits, straight out of the camera.")
DISTRACTORS = ("taken yesterday", "nice light", "from my trip", "at the park", "on the weekend", "(explored)",
               "shot with a phone", "in the morning", "near the old town", "for the album")
EVAL_CAPTIONS = {"structure": ("a {color} {name}", "a {name} in {color}", "a photo of a {color} {name}"),
                 "groups": ("{color} {name}s", "{name}s in {color}", "a photo of {color} {name}s")}
TITLE_SHARES = {"camera": 0.15, "date": 0.05, "place": 0.05, "empty": 0.05, "names": 0.70}
DESCRIPTION_SHARES = {"empty": 0.40, "unrelated": 0.15, "names": 0.45}
# YFCC15M keeps only photos with English natural language in the title or the description, so a
# title that is a file name, a date or nothing comes with a description in words
NATURAL_DESCRIPTION_SHARES = {"unrelated": 0.25, "names": 0.75}
NAMING_SHARES = {"exact": 0.60, "synonym": 0.25, "partial": 0.15}
OOD_PER_CLASS = 20             # out-of-domain (line drawing) images per class, at most eval_per_class
STS_ANCHORS = 48               # x 4 graded pairs in eval_text/sts.tsv
SENTENCES_PER_CLASS = {"train": 12, "dev": 8}   # eval_text/sst/
MIRROR_PATH = "data/images/{h3a}/{h3b}/{h}.jpg"
DESIGNS = ("colour", "structure", "groups")


@dataclass
class DemoDataConfig:
    """What the demo data generator makes: how many rows and held-out images, from which seed."""
    out: Path
    samples: int = 4000           # training rows in the metadata (a few % are bad rows on purpose)
    eval_per_class: int = 40      # held-out images per class, in each of eval/train and eval/val
    seed: int = 0
    workers: int = 2
    noisy_captions: bool = True   # False: every title and description names the class exactly (the study's control)
    # "groups": this module's design (the default); "structure": its one-object predecessor; "colour": the
    # first demo data (demokit/data_colour.py)
    design: str = DEFAULT_DESIGN


@dataclass(frozen=True)
class Scene:
    """Everything one image shows. Only `pattern` and `shape` are the class; the rest is nuisance."""
    pattern: str
    shape: str
    color: str          # the object's colour name
    color2: str         # the pattern's second colour name
    background: tuple[int, int, int]
    seed: int           # position, size, rotation, pattern phase, gradient, clutter, JPEG quality
    design: str = DEFAULT_DESIGN
    copies: int = 1     # copies of the object (all of the class, same colours)


def _luma(rgb) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def scene(cls: str, seed: int, design: str = DEFAULT_DESIGN) -> Scene:
    """A random scene of class `cls` ("<pattern> <shape>"): colours and background drawn independently of it."""
    pattern, shape = cls.split()
    geom = GEOMETRY[design]
    rnd = random.Random(seed)
    color = rnd.choice(list(COLORS))
    color2 = rnd.choice([c for c in COLORS if abs(_luma(COLORS[c]) - _luma(COLORS[color])) >= MIN_PATTERN_CONTRAST])
    obj_luma = _luma(COLORS[color]) if pattern == "plain" else (_luma(COLORS[color]) + _luma(COLORS[color2])) / 2
    while True:   # a muted background of any hue, its luminance away from the object's
        base, sat = rnd.uniform(40, 215), rnd.uniform(0, 45)
        hue = rnd.uniform(0, 2 * math.pi)
        bg = tuple(int(max(0, min(255, base + sat * math.cos(hue + k * 2 * math.pi / 3)))) for k in range(3))
        if abs(_luma(bg) - obj_luma) >= MIN_BACKGROUND_CONTRAST:
            seed = rnd.randrange(2 ** 31)
            copies = rnd.randint(*geom.copies) if geom.plural else 1   # no draw for one: structure stays as it was
            return Scene(pattern, shape, color, color2, bg, seed, design, copies)


LAYOUT_ATTEMPTS = 10_000      # whole-group layouts tried before giving up (4 copies: 3 on average, 13 at most in 100)


def _layout(s: Scene, rnd: random.Random, w: int, h: int) -> list[tuple[float, float, float]]:
    """(cx, cy, r) of each copy. Each copy's circle of radius 1.1 r lies in the central square (the
    evaluation's centre crop keeps it) and the centres are at least 1.1x the sum of the radii apart;
    triangle and star tips reach 1.2 r, so a tip may touch a neighbour or leave the square by a little."""
    geom, short = GEOMETRY[s.design], min(w, h)
    x0, y0 = (w - short) / 2, (h - short) / 2
    for _attempt in range(LAYOUT_ATTEMPTS):
        placed: list[tuple[float, float, float]] = []
        for _ in range(s.copies):
            for _try in range(50):
                r = rnd.uniform(*geom.radius) * short
                cx, cy = x0 + rnd.uniform(r * 1.1, short - r * 1.1), y0 + rnd.uniform(r * 1.1, short - r * 1.1)
                if all(math.hypot(cx - px, cy - py) >= 1.1 * (r + pr) for px, py, pr in placed):
                    placed.append((cx, cy, r))
                    break
            else:
                break       # no room left for this copy: lay the whole group out again
        if len(placed) == s.copies:
            return placed
    raise ValueError(f"no room for {s.copies} copies of radius {geom.radius} x the short side in {w}x{h}: "
                     "shrink GEOMETRY's radius or copies")


def _shape_points(shape: str, cx: float, cy: float, r: float, rot: float) -> list[tuple[float, float]]:
    if shape == "square":
        n, radii = 4, [r] * 4
    elif shape == "triangle":
        n, radii = 3, [r * 1.2] * 3
    else:  # star: five fat arms, so a pattern still shows inside them
        n, radii = 10, [r * 1.2 if i % 2 == 0 else r * 0.58 for i in range(10)]
    return [(cx + radii[i] * math.cos(rot + 2 * math.pi * i / n), cy + radii[i] * math.sin(rot + 2 * math.pi * i / n))
            for i in range(n)]


def _pattern_mask(pattern: str, w: int, h: int, r: float, rnd: random.Random, geom: Geometry) -> np.ndarray:
    """Where the second colour goes, over the whole canvas (the shape mask cuts it out). Element sizes
    are relative to the object radius `r` (the scale rule in the module docstring)."""
    if pattern == "plain":
        return np.zeros((h, w), bool)
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    a = rnd.uniform(0, math.pi)
    u = x * math.cos(a) + y * math.sin(a) + rnd.uniform(0, 100)
    v = -x * math.sin(a) + y * math.cos(a) + rnd.uniform(0, 100)
    if pattern == "striped":
        band = r * rnd.uniform(*geom.stripe)
        return np.floor(u / band) % 2 == 1
    if pattern == "checkered":
        cell = r * rnd.uniform(*geom.check)
        return (np.floor(u / cell) + np.floor(v / cell)) % 2 == 1
    spacing = r * rnd.uniform(*geom.spot_spacing)    # spotted: dots 0.6 x spacing across, gaps 0.4 x spacing
    du, dv = u % spacing - spacing / 2, v % spacing - spacing / 2
    return du * du + dv * dv < (0.3 * spacing) ** 2


def placement(s: Scene, w: int, h: int) -> tuple[random.Random, float, list[tuple[float, float, float]]]:
    """The first draws of `render`: its random stream, the background gradient's slope and the copies'
    layout (cx, cy, r), which tests compare with the rendered pixels."""
    rnd = random.Random(s.seed)
    slope = rnd.uniform(-45, 45)
    return rnd, slope, _layout(s, rnd, w, h)


def render(s: Scene, w: int, h: int) -> tuple[Image.Image, np.ndarray]:
    """The scene as an RGB image of w x h, and the object's mask (True where the object is visible)."""
    rnd, slope, layout = placement(s, w, h)
    img = Image.new("RGB", (w, h), s.background)
    d = ImageDraw.Draw(img)
    for y in range(0, h, 4):   # a luminance gradient across the background
        d.rectangle([0, y, w, y + 4], fill=tuple(int(max(0, min(255, v + y / h * slope))) for v in s.background))
    short = min(w, h)
    clutter = [_clutter_item(rnd, w, h, short) for _ in range(rnd.randint(*CLUTTER))]
    for item in clutter[: len(clutter) // 2 + 1]:      # most behind the object, some in front
        item(d)
    inside, second = np.zeros((h, w), bool), np.zeros((h, w), bool)
    for cx, cy, r in layout:                           # a later copy lies on top of an earlier one
        obj = _object_mask(s.shape, w, h, cx, cy, r, rnd)
        inside |= obj
        second = np.where(obj, _pattern_mask(s.pattern, w, h, r, rnd, GEOMETRY[s.design]), second)
    shade = lambda rgb: np.array([max(0, min(255, v + rnd.randint(-20, 20))) for v in rgb], np.uint8)  # noqa: E731
    c1, c2 = shade(COLORS[s.color]), shade(COLORS[s.color2])
    a = np.asarray(img).copy()
    a[inside & ~second], a[inside & second] = c1, c2
    img = Image.fromarray(a)
    d = ImageDraw.Draw(img)
    front = clutter[len(clutter) // 2 + 1:]
    for item in front:
        item(d)
    mask = inside
    if front:   # the object's visible part: what the front clutter did not cover
        covered = Image.new("L", (w, h), 0)
        cd = ImageDraw.Draw(covered)
        for item in front:
            item(cd, 255)
        mask = inside & (np.asarray(covered) == 0)
    return img, mask


def _object_mask(shape: str, w: int, h: int, cx: float, cy: float, r: float, rnd: random.Random) -> np.ndarray:
    """Where the object is (a rotation is drawn from `rnd` for every shape but the circle)."""
    shape_img = Image.new("L", (w, h), 0)
    sd = ImageDraw.Draw(shape_img)
    if shape == "circle":
        sd.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    else:
        sd.polygon(_shape_points(shape, cx, cy, r, rnd.uniform(0, 2 * math.pi)), fill=255)
    return np.asarray(shape_img) > 127


def _edges(mask: np.ndarray, width: int) -> np.ndarray:
    """The boundary pixels of `mask`, thickened to about `width` px."""
    edge = np.zeros_like(mask)
    edge[1:] |= mask[1:] != mask[:-1]
    edge[:, 1:] |= mask[:, 1:] != mask[:, :-1]
    size = max(3, width | 1)        # MaxFilter takes an odd size
    return np.asarray(Image.fromarray(edge.astype(np.uint8) * 255).filter(ImageFilter.MaxFilter(size))) > 127


def render_sketch(s: Scene, w: int, h: int) -> Image.Image:
    """The out-of-domain rendering of a scene's class: a line drawing on plain paper. The object's
    outline and its pattern's edges (stripes as hatching, checks as a grid, spots as rings; plain:
    empty) in one dark ink; no colour fill, no clutter, no gradient. Element sizes follow the scale
    rule, and lines are >= 2 px at the coarsest 64 px view, so the class stays visible."""
    rnd = random.Random(f"sketch-{s.seed}")
    paper = tuple(int(v) for v in np.clip(rnd.uniform(225, 250) + np.array([rnd.uniform(-6, 6) for _ in range(3)]),
                                          0, 255))
    ink = tuple(rnd.randint(10, 70) for _ in range(3))
    short = min(w, h)
    lines = np.zeros((h, w), bool)
    width = max(2, round(short / 32))          # 2 px at the 64 px view
    for cx, cy, r in _layout(s, rnd, w, h):
        inside = _object_mask(s.shape, w, h, cx, cy, r, rnd)
        pattern = _pattern_mask(s.pattern, w, h, r, rnd, GEOMETRY[s.design])
        lines |= _edges(inside, width) | (_edges(pattern, max(2, width // 2)) & inside)
    a = np.empty((h, w, 3), np.uint8)
    a[:] = paper
    a[lines] = ink
    return Image.fromarray(a)


def _clutter_item(rnd: random.Random, w: int, h: int, short: int):
    """One plain clutter item (bar, blob or line) of any colour, small next to the object."""
    kind = rnd.choice(("bar", "blob", "line"))
    x, y = rnd.uniform(0, w), rnd.uniform(0, h)
    s = rnd.uniform(0.04, 0.12) * short
    color = tuple(rnd.randint(0, 255) for _ in range(3))
    if kind == "bar":
        box = [x, y, x + s, y + s * rnd.uniform(0.15, 0.35)] if rnd.random() < 0.5 else [x, y, x + s * 0.25, y + s]
    else:
        box = [x, y, x + s, y + s * rnd.uniform(0.3, 0.6)]
    end = (x + rnd.uniform(-2, 2) * s, y + rnd.uniform(-2, 2) * s)
    width = max(1, int(0.025 * short))

    def draw_item(d: ImageDraw.ImageDraw, fill=None) -> None:
        f = color if fill is None else fill
        if kind == "bar":
            d.rectangle(box, fill=f)
        elif kind == "blob":
            d.ellipse(box, fill=f)
        else:
            d.line([(x, y), end], fill=f, width=width)
    return draw_item


def draw(cls: str, w: int, h: int, seed: int, design: str = DEFAULT_DESIGN) -> bytes:
    """One JPEG of class `cls` ("<pattern> <shape>") with its nuisances drawn from `seed`."""
    img, _ = render(scene(cls, seed, design), w, h)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=random.Random(seed).randint(80, 95))
    return buf.getvalue()


def draw_sketch(cls: str, w: int, h: int, seed: int, design: str = DEFAULT_DESIGN) -> bytes:
    """One JPEG of class `cls` as a line drawing (`render_sketch`): the out-of-domain set."""
    buf = io.BytesIO()
    render_sketch(scene(cls, seed, design), w, h).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _size(rnd: random.Random) -> tuple[int, int]:
    short, aspect = rnd.randint(96, 300), rnd.uniform(0.6, 1.8)
    return (int(short * aspect), short) if aspect >= 1 else (short, int(short / aspect))


def _write_image(job: tuple) -> None:
    path, cls, w, h, seed, design, *sketch = job
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes((draw_sketch if sketch else draw)(cls, w, h, seed, design))


def _pick(rnd: random.Random, shares: dict[str, float]) -> str:
    u, acc = rnd.random(), 0.0
    for k, p in shares.items():
        acc += p
        if u < acc:
            return k
    return k


def _plural(name: str) -> str:
    return name + ("es" if name.endswith("x") else "s")


def naming_text(rnd: random.Random, cls: str, color: str, kind: str | None = None, plural: bool = False) -> str:
    """A caption that names the object: exactly, with a near-synonym, or only in part (NAMING_SHARES);
    `plural` for a picture of several copies ("striped stars")."""
    pattern, shape = cls.split()
    kind = kind or _pick(rnd, NAMING_SHARES)
    if kind == "synonym":
        which = rnd.choice(("pattern", "shape", "both"))
        p = rnd.choice(SYNONYMS[pattern]) if which != "shape" else pattern
        sh = rnd.choice(SYNONYMS[shape]) if which != "pattern" else shape
        name = f"{p} {sh}"
    elif kind == "partial":
        if PARTS[pattern] and rnd.random() < 0.5:
            part = rnd.choice(PARTS[pattern])
            return rnd.choice(("{p}", "{P}!", "love these {p}", "{p} {d}", "so many {p}")).format(
                p=part, P=part.capitalize(), d=rnd.choice(DISTRACTORS))
        name = shape
    else:
        name = f"{color} {cls}" if rnd.random() < 1 / 3 else cls
    if plural:
        name = _plural(name)
    return rnd.choice(NAMING_PLURAL if plural else NAMING).format(name=name, Name=name.capitalize(),
                                                                  d=rnd.choice(DISTRACTORS))


def _filler(rnd: random.Random, kind: str) -> str:
    if kind == "camera":
        return rnd.choice(CAMERA_NAMES).format(n4=rnd.randint(0, 9999), n5=f"{rnd.randint(0, 99999):05d}")
    if kind == "date":
        return rnd.choice(DATES).format(y=rnd.randint(2004, 2014), m=rnd.randint(1, 12), dd=rnd.randint(1, 28),
                                        month=rnd.choice(MONTHS))
    if kind == "place":
        return rnd.choice(PLACES)
    if kind == "unrelated":
        return rnd.choice(UNRELATED)
    return ""


def _captions(rnd: random.Random, cls: str, color: str, noisy: bool = True, plural: bool = False) -> tuple[str, str]:
    """Raw (URL-encoded) title and description with Flickr-like noise (the shares in the module docstring)."""
    if noisy:
        tkind = _pick(rnd, TITLE_SHARES)
        dkind = _pick(rnd, NATURAL_DESCRIPTION_SHARES if tkind in ("camera", "date", "empty") else DESCRIPTION_SHARES)
        title = naming_text(rnd, cls, color, plural=plural) if tkind == "names" else _filler(rnd, tkind)
        desc = naming_text(rnd, cls, color, plural=plural) if dkind == "names" else _filler(rnd, dkind)
    else:
        title, desc = (naming_text(rnd, cls, color, "exact", plural), naming_text(rnd, cls, color, "exact", plural))
    if desc:
        noise = rnd.random()
        if noise < 0.1:
            desc = f"<b>{desc}</b> more at http://www.flickr.com/photos/demo/{rnd.randint(1, 99999)}"
        elif noise < 0.2:
            desc = f'{desc}\n\n<a href="http://example.com/x">my site</a> www.example.com'
        elif noise < 0.25:
            desc = f"{desc} &amp; more"
    return quote_plus(title), quote_plus(desc)


def _other_class(rnd: random.Random, cls: str, shared: int) -> str:
    """A class that shares `shared` of its two words (pattern, shape) with `cls`."""
    pattern, shape = cls.split()
    return rnd.choice([c for c in CLASSNAMES if (c.split()[0] == pattern) + (c.split()[1] == shape) == shared])


def text_set(seed: int) -> tuple[list[tuple[str, str, float]], dict[str, list[tuple[str, int]]]]:
    """The demo's text-only evaluation, from the caption grammar (`naming_text`).
    STS pairs, graded like STS-B (0-5): each anchor names its class exactly; its partners are another
    exact wording of the same class and colour (5), a near-synonym of the same class (4), a class
    sharing the pattern or the shape (2.5), a class sharing neither (0). Labelled sentences
    (label = the class's index in CLASSNAMES) name the class exactly or with near-synonyms; the
    partial namings are left out, since they do not determine the class."""
    rnd = random.Random(f"text-{seed}")
    pairs = []
    for _ in range(STS_ANCHORS):
        cls, color = rnd.choice(CLASSNAMES), rnd.choice(list(COLORS))
        anchor = naming_text(rnd, cls, color, "exact")
        pairs += [(anchor, naming_text(rnd, cls, color, "exact"), 5.0),
                  (anchor, naming_text(rnd, cls, color, "synonym"), 4.0),
                  (anchor, naming_text(rnd, _other_class(rnd, cls, 1), color, "exact"), 2.5),
                  (anchor, naming_text(rnd, _other_class(rnd, cls, 0), color, "exact"), 0.0)]
    rnd.shuffle(pairs)
    sentences = {split: [(naming_text(rnd, cls, rnd.choice(list(COLORS)), rnd.choice(("exact", "exact", "synonym"))),
                          ci) for ci, cls in enumerate(CLASSNAMES) for _ in range(n)]
                 for split, n in SENTENCES_PER_CLASS.items()}
    return pairs, sentences


def write_text_set(folder: Path, seed: int) -> None:
    """`text_set` as GLUE files: STS-B's `sts.tsv` (sentence1, sentence2, score) and an SST-2-like
    folder `sst/` (train.tsv, dev.tsv with sentence, label)."""
    pairs, sentences = text_set(seed)
    (folder / "sst").mkdir(parents=True, exist_ok=True)
    (folder / "sts.tsv").write_text("sentence1\tsentence2\tscore\n" + "".join(f"{a}\t{b}\t{y:g}\n" for a, b, y in pairs))
    for split, rows in sentences.items():
        (folder / "sst" / f"{split}.tsv").write_text("sentence\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in rows))


def _meta_row(n: int, pid: int, h: str, title: str, desc: str, url: str, marker: str = "0") -> str:
    f = [str(n), str(pid), h, "1234@N00", "demo", "2012-06-01 12:00:00.0", "1338552000", "", title, desc,
         "", "", "", "", "", f"http://www.flickr.com/photos/demo/{pid}/", url,
         "Attribution License", "http://creativecommons.org/licenses/by/2.0/", "1", "1", "s", "o", "jpg", marker]
    return "\t".join(f) + "\n"


def write_inputs(src: Path, meta: Path, subset: Path, rows: list[str], sub: list[tuple[int, str]]) -> None:
    """The metadata TSV and the subset list, with the bad rows every build must survive: a malformed
    row, a non-UTF-8 row, a duplicate subset id and a subset id the metadata lacks."""
    rows.insert(len(rows) // 2, "1\t2\t3\n")
    sub += [sub[0], (99_999_999, "0")]
    src.mkdir(parents=True, exist_ok=True)
    meta.write_bytes("".join(rows).encode() + _meta_row(len(rows) + 1, 10_000_003, "ff", "caf\udcff", "", "x")
                     .encode("utf-8", "surrogateescape"))
    subset.write_text("".join(f"{n}\t{pid}\t{h}\n" for n, (pid, h) in enumerate(sub, 1)) + f"{len(sub) + 1}\t10000003\tff\n")


def generate(cfg: DemoDataConfig) -> tuple[Path, Path]:
    """Write DIR/source (metadata, subset, images), DIR/eval, DIR/eval_ood and DIR/eval_text. Returns
    (metadata, subset) paths. Skipped when DIR/source/done.json records the same settings."""
    if cfg.design == "colour":
        from demokit import data_colour
        return data_colour.generate(cfg)
    if cfg.design not in GEOMETRY:
        raise ValueError(f"demo data design {cfg.design!r}: choose {' or '.join(DESIGNS)}")
    out = Path(cfg.out)
    src, ev, ood = out / "source", out / "eval", out / "eval_ood"
    done = src / "done.json"
    # the generator's version: 6 added eval_ood/ and eval_text/; 7 the groups design (structure as in 6)
    settings = {"version": 7, **{k: v for k, v in asdict(cfg).items() if k not in ("out", "workers")}}
    design, plural = cfg.design, GEOMETRY[cfg.design].plural
    meta, subset = src / "yfcc100m_dataset.tsv", src / "yfcc100m_subset_data.tsv"
    if done.exists() and json.loads(done.read_text()) == settings:
        return meta, subset
    rnd = random.Random(cfg.seed)
    jobs, rows, sub = [], [], []
    for i in range(cfg.samples):
        pid = 10_000_000 + i * 7
        url = f"http://farm1.staticflickr.com/1/{pid}_demo.jpg"
        h = url_hash(url)
        cls, img_seed = rnd.choice(CLASSNAMES), pid + 7919 * cfg.seed
        # captions draw from their own stream, so clean and noisy builds hold the same images and bad rows
        title, desc = _captions(random.Random(f"caption-{cfg.seed}-{i}"), cls, scene(cls, img_seed, design).color,
                                cfg.noisy_captions, plural)
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
            jobs.append((str(src / "images" / MIRROR_PATH.format(h3a=h[:3], h3b=h[3:6], h=h)), cls, w, hh, img_seed,
                         design))
        rows.append(_meta_row(len(rows) + 1, pid, h, title, desc, url, marker))
        if in_subset:
            sub.append((pid, h))
    write_inputs(src, meta, subset, rows, sub)
    # held-out labelled split, clean captions
    val_caps = []
    for split in ("train", "val"):
        for ci, cname in enumerate(CLASSNAMES):
            for k in range(cfg.eval_per_class):
                seed = 1_000_000 * (1 + (split == "val")) + ci * 10_000 + k + cfg.seed * 7919
                r = random.Random(seed)
                w, hh = _size(r)
                rel = f"{split}/{cname}/{k:04d}.jpg"
                jobs.append((str(ev / rel), cname, w, hh, seed, design))
                if split == "val":
                    val_caps.append({"file": rel, "caption": r.choice(EVAL_CAPTIONS[design]).format(
                        color=scene(cname, seed, design).color, name=cname)})
    # the out-of-domain set: the same classes as line drawings (zero-shot only: no train split)
    for ci, cname in enumerate(CLASSNAMES):
        for k in range(min(OOD_PER_CLASS, cfg.eval_per_class)):
            seed = 3_000_000 + ci * 10_000 + k + cfg.seed * 7919
            w, hh = _size(random.Random(seed))
            jobs.append((str(ood / "val" / cname / f"{k:04d}.jpg"), cname, w, hh, seed, design, "sketch"))
    with Pool(cfg.workers) as pool:
        for _ in pool.imap_unordered(_write_image, jobs, chunksize=64):
            pass
    ev.mkdir(parents=True, exist_ok=True)
    (ev / "classnames.json").write_text(json.dumps(CLASSNAMES, indent=1))
    (ev / "templates.json").write_text(json.dumps(TEMPLATES[design], indent=1))
    (ev / "val_captions.jsonl").write_text("".join(json.dumps(c) + "\n" for c in val_caps))
    for f in ("classnames.json", "templates.json"):
        (ood / f).write_text((ev / f).read_text())
    write_text_set(out / "eval_text", cfg.seed)
    done.write_text(json.dumps(settings))
    return meta, subset


def demo_url_template(base_url: str) -> str:
    return f"{base_url}/" + MIRROR_PATH.format(h3a="{hash[0:3]}", h3b="{hash[3:6]}", h="{hash}")
