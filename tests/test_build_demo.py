"""The demo data set through the real CLI: generated YFCC-format inputs, loopback server, same pipeline;
and the data design's promises: colour does not define a class, structure survives 64 px training."""
import hashlib
import json
import os
import random
import re
import subprocess
import sys
import tarfile
from pathlib import Path
from urllib.parse import unquote_plus

import numpy as np
from PIL import Image

import pytest

from demokit.data import (CLASSNAMES, COLORS, GEOMETRY, PARTS, PATTERNS, SENTENCES_PER_CLASS, SHAPES, STS_ANCHORS,
                          SYNONYMS, TEMPLATES, TITLE_SHARES, _captions, _object_mask, _size, placement, render,
                          render_sketch, scene, text_set)
from demokit import data_colour
from pipeline.manifest import load_manifest

ROOT = Path(__file__).resolve().parent.parent
# any word that names the object, even loosely: class words, near-synonyms, parts
_OBJECT_WORDS = {*PATTERNS, *SHAPES, *(w for v in SYNONYMS.values() for w in v), *(w for v in PARTS.values() for w in v)}
OBJECT_WORD = re.compile(r"\b(" + "|".join(sorted(map(re.escape, _OBJECT_WORDS), key=len, reverse=True)) + r")(e?s)?\b",
                         re.I)   # singular or plural: the groups design's captions say "striped stars"
LUMA = np.array([0.299, 0.587, 0.114], np.float32)
CAMERA_NAME = re.compile(r"^(IMG_|DSC_?|DSCN|P10|_MG_|100_)\d+(\.JPG)?$")


def test_demo_cli_builds_groups_set(tmp_path):
    """The default design (groups) through the real CLI."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "tools/build_yfcc15m.py", "--demo", "--out", str(out),
           "--demo-samples", "240", "--demo-eval-per-class", "2", "--shard-size", "100", "--no-progress"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = load_manifest(out / "shards" / "manifest.json")
    assert m.name == "demo" and load_manifest(out / "manifests" / "demo.json").total_samples == m.total_samples
    c = m.stats["select"]["counts"]
    for reason in ("malformed", "non_utf8", "duplicate_subset_id", "missing_from_metadata"):
        assert c[reason] >= 1, reason
    assert 200 <= m.total_samples <= 240 and len(m.shards) == 3 and all(p.exists() for p in m.index_paths())
    # captions cleaned of HTML and URLs, and Flickr-noisy: many say nothing about the object
    fields, cameras, n = [], 0, 0
    for tar in m.shard_paths():
        with tarfile.open(tar) as t:
            members = {x.name: x for x in t}
            for name in members:
                if not name.endswith(".json"):
                    continue
                meta = json.loads(t.extractfile(members[name]).read())
                txt = t.extractfile(members[name[:-4] + "txt"]).read().decode()
                assert txt and not re.search(r"<|>|http|www\.|&amp;|\n", txt), txt
                title, desc = meta.get("title") or "", meta.get("description") or ""
                assert title or desc
                if not title or CAMERA_NAME.match(title):   # YFCC15M: words in the title or the description
                    assert desc, meta
                fields += [x for x in (title, desc) if x]
                cameras += bool(CAMERA_NAME.match(title))
                n += 1
    assert n == m.total_samples
    naming = sum(bool(OBJECT_WORD.search(f)) for f in fields) / len(fields)
    assert 0.6 <= naming <= 0.88, naming                     # about 3/4 of fields name the object
    # the groups design names several objects: an exact class name is always plural ("striped stars")
    classes = "|".join(CLASSNAMES)
    assert sum(bool(re.search(rf"\b({classes})s\b", f, re.I)) for f in fields) > len(fields) / 5
    assert not [f for f in fields if re.search(rf"\b({classes})\b", f, re.I)]
    assert abs(cameras / n - TITLE_SHARES["camera"]) < 0.1, cameras / n
    # the held-out labelled split, with clean captions that name the class and the object's colour
    ev = out / "eval"
    assert json.loads((ev / "classnames.json").read_text()) == CLASSNAMES == sorted(CLASSNAMES)
    assert len(CLASSNAMES) == 16
    assert json.loads((ev / "templates.json").read_text()) == TEMPLATES["groups"]
    assert all("{}s" in t for t in TEMPLATES["groups"])        # prompts speak of several objects
    for split in ("train", "val"):
        assert sorted(p.name for p in (ev / split).iterdir()) == CLASSNAMES
        assert all(len(list((ev / split / cn).glob("*.jpg"))) == 2 for cn in CLASSNAMES)
    caps = [json.loads(line) for line in (ev / "val_captions.jsonl").read_text().splitlines()]
    assert len(caps) == 32 and all((ev / c["file"]).is_file() for c in caps)
    for c in caps:
        cls = Path(c["file"]).parent.name
        assert re.search(rf"\b{cls}s\b", c["caption"]) and any(re.search(rf"\b{col}\b", c["caption"]) for col in COLORS), c
    check_out_of_domain_set(out / "eval_ood", per_class=2, templates=TEMPLATES["groups"])
    check_text_set(out / "eval_text")
    # rerunning the same command is a no-op that keeps the shards
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_manifest(out / "shards" / "manifest.json").shards == m.shards


def check_out_of_domain_set(ood: Path, per_class: int, templates: list[str]) -> None:
    """The same 16 classes in the eval layout (val/ only), drawn as lines on plain light paper."""
    assert json.loads((ood / "classnames.json").read_text()) == CLASSNAMES
    assert json.loads((ood / "templates.json").read_text()) == templates
    assert sorted(p.name for p in ood.iterdir()) == ["classnames.json", "templates.json", "val"]
    assert sorted(p.name for p in (ood / "val").iterdir()) == CLASSNAMES
    for cn in CLASSNAMES:
        files = sorted((ood / "val" / cn).glob("*.jpg"))
        assert len(files) == per_class, cn
        for f in files:
            a = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32)
            luma = a @ LUMA
            # a plain light ground with thin dark lines: most pixels are paper, some ink, no colour fill
            assert (luma > 200).mean() > 0.6 and (luma < 110).mean() > 0.01, (f, (luma > 200).mean())
            assert np.median(a.max(-1) - a.min(-1)) < 20, f


def _named_class(sentence: str) -> str | None:
    """The class a sentence names with the exact class words, if it does."""
    found = [c for c in CLASSNAMES if re.search(rf"\b{c}\b", sentence, re.I)]
    return found[0] if len(found) == 1 else None


def check_text_set(folder: Path) -> None:
    """STS-B-style graded pairs and GLUE single-sentence files, built from the caption grammar."""
    lines = (folder / "sts.tsv").read_text().splitlines()
    assert lines[0].split("\t") == ["sentence1", "sentence2", "score"]
    rows = [line.split("\t") for line in lines[1:]]
    assert all(len(r) == 3 for r in rows) and len(rows) == 4 * STS_ANCHORS
    by_score: dict[float, list] = {}
    for a, b, y in rows:
        by_score.setdefault(float(y), []).append((a, b))
    assert {k: len(v) for k, v in by_score.items()} == {5.0: STS_ANCHORS, 4.0: STS_ANCHORS, 2.5: STS_ANCHORS,
                                                        0.0: STS_ANCHORS}
    for y, pairs in by_score.items():
        for a, b in pairs:
            anchor = _named_class(a)
            assert anchor is not None, a                        # every anchor names its class exactly
            pattern, shape = anchor.split()
            if y == 4.0:                                        # a near-synonym of the anchor's pattern or shape
                assert any(re.search(rf"\b{w}\b", b, re.I) for w in SYNONYMS[pattern] + SYNONYMS[shape]), (a, b)
                assert _named_class(b) in (None, anchor), (a, b)
                continue
            other = _named_class(b)
            assert other is not None, b
            shared = (other.split()[0] == pattern) + (other.split()[1] == shape)
            assert shared == {5.0: 2, 2.5: 1, 0.0: 0}[y], (y, a, b)
    for split, n in SENTENCES_PER_CLASS.items():
        lines = (folder / "sst" / f"{split}.tsv").read_text().splitlines()
        assert lines[0].split("\t") == ["sentence", "label"]
        rows = [line.split("\t") for line in lines[1:]]
        labels = [int(y) for _, y in rows]
        assert sorted(labels) == sorted(list(range(len(CLASSNAMES))) * n), split
        exact = [(s, y) for s, y in rows if _named_class(s)]
        assert len(exact) > len(rows) / 2 and all(_named_class(s) == CLASSNAMES[int(y)] for s, y in exact)
    # deterministic: the same seed gives the same files
    assert text_set(0) == text_set(0) and text_set(0) != text_set(1)


def dominant_class_color(img: Image.Image) -> str:
    """The demo colour whose pixels (saturated, close to it) are most numerous."""
    a = np.asarray(img.convert("RGB"), dtype=np.int32)
    counts = {c: int((np.abs(a - np.array(rgb)).sum(-1) < 90).sum()) for c, rgb in data_colour.COLORS.items()}
    return max(counts, key=counts.get)


def test_demo_cli_builds_colour_set(tmp_path):
    """The first design (demokit/data_colour.py, `--demo-design colour`): colour x shape, every caption
    names its class."""
    out = tmp_path / "demo"
    cmd = [sys.executable, "tools/build_yfcc15m.py", "--demo", "--demo-design", "colour", "--out", str(out),
           "--demo-samples", "240",
           "--demo-eval-per-class", "2", "--shard-size", "100", "--no-progress"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = load_manifest(out / "shards" / "manifest.json")
    assert m.name == "demo" and load_manifest(out / "manifests" / "demo.json").total_samples == m.total_samples
    c = m.stats["select"]["counts"]
    for reason in ("malformed", "non_utf8", "duplicate_subset_id", "missing_from_metadata"):
        assert c[reason] >= 1, reason
    assert 200 <= m.total_samples <= 240 and len(m.shards) == 3 and all(p.exists() for p in m.index_paths())
    # every caption names the colour and shape that its image shows, cleaned of HTML and URLs
    words = re.compile(rf"\b({'|'.join(data_colour.COLORS)})\b.*|.*\b({'|'.join(data_colour.SHAPES)})\b", re.I)
    n = 0
    for tar in m.shard_paths():
        with tarfile.open(tar) as t:
            members = {x.name: x for x in t}
            for name in members:
                if not name.endswith(".txt"):
                    continue
                txt = t.extractfile(members[name]).read().decode()
                assert words.match(txt) and not re.search(r"<|>|http|www\.|&amp;|\n", txt), txt
                color = next(c for c in data_colour.COLORS if re.search(rf"\b{c}\b", txt, re.I))
                img = Image.open(t.extractfile(members[name[:-3] + "jpg"]))
                assert dominant_class_color(img) == color, (name, txt)
                n += 1
    assert n == m.total_samples
    # the held-out labelled split
    ev = out / "eval"
    assert json.loads((ev / "classnames.json").read_text()) == data_colour.CLASSNAMES == sorted(data_colour.CLASSNAMES)
    assert len(data_colour.CLASSNAMES) == 16
    assert all("{}" in t for t in json.loads((ev / "templates.json").read_text()))
    for split in ("train", "val"):
        assert sorted(p.name for p in (ev / split).iterdir()) == data_colour.CLASSNAMES
        assert all(len(list((ev / split / cn).glob("*.jpg"))) == 2 for cn in data_colour.CLASSNAMES)
    caps = [json.loads(line) for line in (ev / "val_captions.jsonl").read_text().splitlines()]
    assert len(caps) == 32 and all((ev / c["file"]).is_file() for c in caps)
    for c in caps:
        cls = Path(c["file"]).parent.name
        assert cls.split()[0] in c["caption"] and cls.split()[1] in c["caption"]
        assert dominant_class_color(Image.open(ev / c["file"])) == cls.split()[0]
    # rerunning the same command is a no-op that keeps the shards
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_manifest(out / "shards" / "manifest.json").shards == m.shards


def _at_training_size(img: Image.Image, mask: np.ndarray, size: int = 64) -> tuple[np.ndarray, np.ndarray]:
    """The coarsest view training sees: the whole image, short side `size` (antialiased), and the pixels
    that lie wholly inside the object."""
    s = size / min(img.size)
    wh = (max(size, round(img.width * s)), max(size, round(img.height * s)))
    small = np.asarray(img.resize(wh, Image.BILINEAR), dtype=np.float32)
    inside = np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize(wh, Image.BILINEAR)) >= 250
    return small, inside


@pytest.mark.parametrize("design", ["groups", "structure"])
def test_colour_does_not_define_the_class(design):
    """A nearest-centroid classifier on colour (the object's mean colour and the image's) stays near chance,
    while a structure statistic (luminance spread inside the object) separates plain from patterned."""
    def features(split: int):
        colour, spread, labels = [], [], []
        for ci, cls in enumerate(CLASSNAMES):
            for k in range(12):
                seed = split * 100_000 + ci * 100 + k
                w, h = _size(random.Random(seed))
                img, mask = render(scene(cls, seed, design), w, h)
                a, inside = _at_training_size(img, mask)
                colour.append(np.concatenate([a[inside].mean(0), a.reshape(-1, 3).mean(0)]))
                spread.append((a[inside] @ LUMA).std())
                labels.append(ci)
        return np.array(colour), np.array(spread), np.array(labels)

    def nearest_centroid(train_x, train_y, test_x, test_y):
        cents = np.stack([train_x[train_y == c].mean(0) for c in range(len(CLASSNAMES))])
        pred = ((test_x[:, None, :] - cents[None]) ** 2).sum(-1).argmin(1)
        return (pred == test_y).mean()

    (c_tr, s_tr, y_tr), (c_te, s_te, y_te) = features(0), features(1)
    chance = 1 / len(CLASSNAMES)
    acc = nearest_centroid(c_tr, y_tr, c_te, y_te)
    assert acc < 2 * chance, acc          # colour says (almost) nothing about the class
    plain = np.array([CLASSNAMES[y].startswith("plain") for y in y_te])
    assert s_te[plain].max() < 5 < 15 < s_te[~plain].min(), (s_te[plain].max(), s_te[~plain].min())


@pytest.mark.parametrize("design", ["groups", "structure"])
def test_structure_survives_training_resolution(design):
    """Every pattern keeps its contrast at the coarsest training view (short side 64 px), for every size,
    shape and colour drawn; plain objects stay flat."""
    g = GEOMETRY[design]
    # the scale rule: the smallest object's pattern elements are >= 4 px at 64 px (spots: dots 0.6 of the
    # spacing); along the axis a 4:3 crop squeezes into 64 x 64, stripes and checks >= 3 px, spot gaps >= 2.4 px
    smallest = g.radius[0] * 64
    assert smallest * min(g.stripe[0], g.check[0], 0.6 * g.spot_spacing[0]) >= 4 * (1 - 1e-9)
    assert smallest * 0.75 * min(g.stripe[0], g.check[0], 0.6 * g.spot_spacing[0]) >= 3 * (1 - 1e-9)
    assert smallest * 0.75 * 0.4 * g.spot_spacing[0] >= 2.4
    for cls in CLASSNAMES:
        for seed in range(20):
            w, h = _size(random.Random(seed))
            img, mask = render(scene(cls, seed, design), w, h)
            a, inside = _at_training_size(img.convert("L").convert("RGB"), mask)
            assert inside.sum() >= 150, (cls, seed)          # the object is big enough to see
            spread = a[inside][:, 0].std()
            if cls.startswith("plain"):
                assert spread < 5, (cls, seed, spread)
            else:
                assert spread > 15, (cls, seed, spread)


def test_shapes_are_distinguishable():
    """Same scene, different shapes: the object's area differs (the circle's is the largest)."""
    for design in ("groups", "structure"):
        areas = {s: int(render(scene(f"plain {s}", 3, design), 200, 200)[1].sum()) for s in SHAPES}
        assert len(set(areas.values())) == 4 and max(areas, key=areas.get) == "circle", (design, areas)


def test_groups_lay_out_separate_copies_in_the_central_square():
    """The groups design: 2-4 copies of the class object (every count drawn) of the design's radii, their
    centres spaced (>= 1.1x the sum of the radii), each copy's circle in the central square; and the
    rendered objects are those copies: every object pixel lies within 1.2 r (a tip) of a centre, and
    every centre is an object pixel."""
    counts = set()
    for seed in range(120):
        w, h = _size(random.Random(seed))
        cls = CLASSNAMES[seed % 16]
        s = scene(cls, seed)
        copies = placement(s, w, h)[2]        # the layout render draws
        counts.add(len(copies))
        assert len(copies) == s.copies
        short = min(w, h)
        x0, y0 = (w - short) / 2, (h - short) / 2
        for i, (cx, cy, r) in enumerate(copies):
            assert GEOMETRY["groups"].radius[0] * short <= r <= GEOMETRY["groups"].radius[1] * short
            assert x0 + r <= cx <= x0 + short - r and y0 + r <= cy <= y0 + short - r
            for px, py, pr in copies[:i]:
                assert ((cx - px) ** 2 + (cy - py) ** 2) ** 0.5 >= 1.1 * (r + pr)
        img, mask = render(s, w, h)
        yy, xx = np.mgrid[0:h, 0:w]
        near = np.zeros((h, w), bool)
        for cx, cy, r in copies:
            near |= (xx - cx) ** 2 + (yy - cy) ** 2 <= (1.2 * r + 1.5) ** 2
            if (xx[mask] - cx).size:
                assert _object_mask(s.shape, w, h, cx, cy, r, random.Random(0))[int(cy), int(cx)]
        assert not (mask & ~near).any(), (cls, seed)
        assert mask.sum() > 0.5 * sum(np.pi * (0.5 * r) ** 2 for _, _, r in copies), (cls, seed)
    assert counts == {2, 3, 4}
    assert scene("striped star", 1, "structure").copies == 1


def test_structure_design_is_unchanged():
    """The structure design's images, drawings and captions, pinned: docs/NCLIP.md's rounds 2-6 and the
    earlier tables in docs/DEMO.md were measured on them (the hash is of the code before the groups design)."""
    h = hashlib.sha256()
    for i, cls in enumerate(["striped star", "spotted circle", "checkered triangle", "plain square"]):
        seed = 1000 + i
        w, hh = _size(random.Random(seed))
        img, mask = render(scene(cls, seed, "structure"), w, hh)
        h.update(np.asarray(img).tobytes())
        h.update(mask.tobytes())
        h.update(np.asarray(render_sketch(scene(cls, seed, "structure"), w, hh)).tobytes())
        h.update(repr(_captions(random.Random(seed), cls, "red")).encode())
    assert h.hexdigest() == "1c0051f798d8f69401d831888b942ac3db2cda29b88c43ee5a0cb61a478ddacc"


@pytest.mark.parametrize("plural", [False, True])
def test_clean_captions_name_the_class_exactly(plural):
    """`--demo-clean-captions` (the caption study's control): title and description both name the exact
    class, plural in the groups design; the noisy captions often do not."""
    name = re.compile(r"\bstriped stars\b" if plural else r"\bstriped star\b(?!s)", re.I)
    noisy_exact = 0
    for i in range(200):
        title, desc = map(unquote_plus, _captions(random.Random(i), "striped star", "red", False, plural))
        assert name.search(title) and name.search(desc), (title, desc)
        noisy = " ".join(map(unquote_plus, _captions(random.Random(i), "striped star", "red", True, plural)))
        noisy_exact += bool(name.search(noisy))
    assert noisy_exact < 150
