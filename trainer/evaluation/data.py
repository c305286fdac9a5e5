"""Evaluation data: labelled image sets, the evaluation directory layout, the evaluation transform.

Readers (each returns `Sample`s; decoding happens later, batch by batch):
- an ImageFolder directory, `<root>/<class name>/*.jpg`; class order from a `classnames.json` in
  the root or its parent, else sorted directory names;
- webdataset tar shards whose samples carry an image (`jpg`/`jpeg`/`png`/`webp`) and an integer
  label (`cls`);
- `EvalData.open`: the demo's held-out layout (docs/ARCHITECTURE.md "Demo data"),
  `<dir>/{train,val}/...` plus `classnames.json`, `templates.json` and `val_captions.jsonl`; a
  CLIP-benchmark webdataset folder as it is published (`classnames.txt`,
  `zeroshot_classification_templates.txt` with `{c}`, `{split}/nshards.txt` and
  `{split}/0.tar ...`; `test/` is evaluated, `train/` where present trains the probe); or a
  single labelled set of either kind.

Images decode with PIL; a WebP image (the CLIP benchmark's default member, which the pillow-simd
built here cannot read) decodes with OpenCV instead.

Images that cannot be read (missing, truncated, not an image) are counted and named in `BadImages`
and skipped; evaluation continues on the rest. So are samples whose label is not one of the
classes, and tar members larger than `MAX_IMAGE_BYTES` (never read). Only regular files are
listed: a FIFO or a device named like an image is never opened.
"""
from __future__ import annotations

import glob
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from pipeline.image_open import open_image
from pipeline.regular_files import is_regular, read_regular
from pipeline.shards import MAX_IMAGE_BYTES, iter_tar_samples

METADATA_DIR = Path(__file__).resolve().parents[1] / "data"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_LIST_BYTES = 64 << 20      # classnames.json, templates.json, val_captions.jsonl
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_BENCHMARK_CLASSES = "classnames.txt"
CLIP_BENCHMARK_TEMPLATES = "zeroshot_classification_templates.txt"
CLIP_BENCHMARK_TYPE = "dataset_type.txt"


def imagenet_classnames() -> list[str]:
    """The 1000 ImageNet class names of OpenAI's CLIP (also used by OpenCLIP)."""
    return json.loads((METADATA_DIR / "imagenet_classnames.json").read_text())


def imagenet_templates() -> list[str]:
    """The SLIP paper's 7 ImageNet prompt templates."""
    return json.loads((METADATA_DIR / "imagenet_templates.json").read_text())


# ============================================================================ images

class EvalTransform:
    """Resize (shorter side, bicubic) + CenterCrop + normalise: pixel for pixel what torchvision's
    Resize + CenterCrop + convert("RGB") + ToTensor + Normalize compute on a PIL image, i.e.
    OpenCLIP's evaluation transform (and timm's, with crop_pct = image_size / resize). Resampling
    itself is PIL's: pillow-simd rounds some resampled pixels a few levels apart from Pillow."""

    def __init__(self, image_size: int, resize: int | None = None, mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD):
        self.size, self.resize = image_size, resize or image_size
        self.mean = torch.tensor(mean).view(3, 1, 1)
        self.std = torch.tensor(std).view(3, 1, 1)

    @classmethod
    def from_recipe(cls, recipe) -> EvalTransform:
        """The transform matching a training recipe (pipeline/recipe.py): its image size, eval resize
        (None = image size) and normalisation (a converted checkpoint's recipe carries the source
        model's mean and std)."""
        return cls(recipe.image_size, recipe.eval_resize, tuple(recipe.mean), tuple(recipe.std))

    @staticmethod
    def resized_size(width: int, height: int, short_side: int) -> tuple[int, int]:
        """The size torchvision's Resize(short_side) gives a PIL image: the shorter side becomes
        `short_side`, the longer one `int(short_side * long / short)` (truncated, not rounded)."""
        if width <= height:
            return short_side, int(short_side * height / width)
        return int(short_side * width / height), short_side

    @staticmethod
    def crop_offset(length: int, crop: int) -> int:
        """torchvision's CenterCrop offset along one side: `int(round((length - crop) / 2))` (ties to
        even); a longer crop pads the image with zeros, (crop - length) // 2 of them before."""
        if crop > length:
            return -((crop - length) // 2)
        return int(round((length - crop) / 2.0))

    def crop(self, img: Image.Image) -> Image.Image:
        """Resized and centre-cropped, in the image's own mode (converted to RGB afterwards, as
        torchvision's pipeline does: a palette image resamples as a palette image)."""
        w, h = img.size
        nw, nh = self.resized_size(w, h, self.resize)
        if (nw, nh) != (w, h):
            img = img.resize((nw, nh), Image.BICUBIC)
        left, top = self.crop_offset(nw, self.size), self.crop_offset(nh, self.size)
        return img.crop((left, top, left + self.size, top + self.size))   # outside the image: zeros

    def to_tensor(self, img: Image.Image) -> torch.Tensor:
        """RGB float [3, H, W] in [0, 1], normalised."""
        pixels = np.asarray(img.convert("RGB"), dtype=np.uint8).copy()
        x = torch.from_numpy(pixels).permute(2, 0, 1).float().div_(255)
        return (x - self.mean) / self.std

    def __call__(self, img: Image.Image) -> torch.Tensor:
        return self.to_tensor(self.crop(img))


@dataclass
class BadImages:
    """Images that could not be read: counted and named, never fatal."""
    items: list[str] = field(default_factory=list)

    def add(self, name: str, err: BaseException) -> None:
        self.items.append(f"{name}: {type(err).__name__}: {err}")

    def as_dict(self) -> dict:
        return {"count": len(self.items), "files": self.items}


def _decode(data: bytes | None, path: str | Path | None) -> Image.Image:
    if data is None:
        data = read_regular(Path(path), MAX_IMAGE_BYTES, "an image")
    return open_image(data)    # fully decoded, so a truncated file fails now; WebP through OpenCV


# ============================================================================ labelled sets

@dataclass
class Sample:
    name: str                          # file path or shard:key, for reports
    label: int
    path: Path | None = None
    data: bytes | None = None


def _read_json_list(path: Path, what: str) -> list[str]:
    try:
        value = json.loads(read_regular(path, MAX_LIST_BYTES, what))
    except (OSError, ValueError, RecursionError) as e:
        raise ValueError(f"{path}: cannot read {what} ({e})") from e
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{path}: {what} must be a JSON list of strings")
    return value


def read_list(path: str | Path, what: str) -> list[str]:
    """A list of class names or templates given by the user or shipped in the repository: a JSON list
    (`.json`), else a text file with one item a line, where lines starting with `#` are comments
    (the shipped lists name their sources that way)."""
    path = Path(path)
    if path.suffix == ".json":
        return _read_json_list(path, what)
    items = [line for line in read_lines(path, what) if not line.startswith("#")]
    if not items:
        raise ValueError(f"{path}: no {what}")
    return items


def prompt_templates(templates: list[str]) -> list[str]:
    """Templates with the class as `{}` (the CLIP benchmark writes `{c}`)."""
    return [t.replace("{c}", "{}") for t in templates]


def find_classnames(root: Path, explicit: str | None = None) -> list[str] | None:
    """class names given explicitly (read_list), or classnames.json in `root` or its parent (demo
    layout), else None."""
    if explicit:
        return read_list(explicit, "class names")
    for cand in (root / "classnames.json", root.parent / "classnames.json"):
        if cand.is_file():
            return _read_json_list(cand, "class names")
    return None


def image_folder(root: str | Path, classnames: list[str] | None = None) -> tuple[list[Sample], list[str]]:
    """Samples of `<root>/<class dir>/<image>`; labels index `classnames` (default: sorted dir names)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such evaluation directory")
    dirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    if classnames is None:
        classnames = dirs
    index = {c: i for i, c in enumerate(classnames)}
    unknown = [d for d in dirs if d not in index]
    if unknown:
        raise ValueError(f"{root}: class directories not in classnames.json: {unknown[:5]}")
    samples = [Sample(str(p), index[d], path=p) for d in dirs for p in sorted((root / d).iterdir())
               if p.suffix.lower() in IMAGE_EXTENSIONS and is_regular(p)]
    if not samples:
        raise ValueError(f"{root}: no images found (expected <root>/<class name>/*.jpg)")
    return samples, classnames


def shard_paths(spec: str | Path) -> list[Path]:
    """A directory of .tar shards, a glob, or a single tar."""
    p = Path(spec)
    if not p.exists() and not glob.has_magic(str(spec)):
        raise FileNotFoundError(f"{spec}: no such file or directory")
    if p.is_dir():
        paths = sorted(p.glob("*.tar"))
    else:
        paths = sorted(Path(x) for x in glob.glob(str(spec)))
    if not paths:
        raise FileNotFoundError(f"{spec}: no .tar shards found")
    return paths


def _tar_groups(path: Path, bad: BadImages) -> dict[str, dict[str, bytes]]:
    """Members of one tar grouped by sample key (`dir/key.ext` -> {ext: bytes}), in tar order. A
    damaged tar is reported in `bad` and keeps the samples read before the damage."""
    groups: dict[str, dict[str, bytes]] = {}
    if not is_regular(path):
        bad.add(str(path), OSError("not a regular file; not opened"))
        return groups
    try:
        with tarfile.open(path) as tar:
            for key, parts in iter_tar_samples(tar):   # webdataset's key/extension rule
                big = [m for m in parts.values() if m.size > MAX_IMAGE_BYTES]
                if big:
                    bad.add(f"{path}:{key}", ValueError(f"member {big[0].name!r} has {big[0].size} bytes, more than "
                                                        f"the {MAX_IMAGE_BYTES} read for a sample; not read"))
                    groups[key] = {}
                    continue
                groups.setdefault(key, {}).update({ext: tar.extractfile(m).read() for ext, m in parts.items()})
    except (tarfile.TarError, OSError, EOFError) as e:
        bad.add(str(path), e)
    return groups


def _image_member(parts: dict[str, bytes]) -> bytes | None:
    return next((parts[e] for e in ("jpg", "jpeg", "png", "webp") if e in parts), None)


def _tar_samples(paths: Sequence[Path], bad: BadImages, member: str, what: str, parse):
    """(name, image bytes, parse(parts[member])) for every sample of the tars that has an image and a
    parsable `member` (`what` names it in the report); the others are reported in `bad` and skipped."""
    for path in paths:
        for key, parts in _tar_groups(path, bad).items():
            if not parts:
                continue           # reported by _tar_groups
            name = f"{path}:{key}"
            img = _image_member(parts)
            try:
                if img is None:
                    raise ValueError("sample has no image")
                if member not in parts:
                    raise ValueError(f"sample has no {what}")
                value = parse(parts[member])
            except (ValueError, UnicodeDecodeError) as e:
                bad.add(name, e)
                continue
            yield name, img, value


def webdataset_samples(paths: Sequence[Path], bad: BadImages) -> list[Sample]:
    """Labelled samples (image bytes + `cls`) from webdataset tars."""
    return [Sample(name, label, data=img)
            for name, img, label in _tar_samples(paths, bad, "cls", "cls label", lambda b: int(b.decode().strip()))]


def webdataset_captioned(paths: Sequence[Path], bad: BadImages) -> tuple[list[Sample], list[tuple[Path, str]]]:
    """Images (label -1) and their captions from the CLIP benchmark's retrieval shards: each sample's
    `txt` holds its captions, one a line (a newline inside a caption is written as `\\n`). A caption
    pair names its image by the sample's name (`shard:key`)."""
    def lines(b: bytes) -> list[str]:
        return [c.replace("\\n", " ").strip() for c in b.decode("utf-8").splitlines()]
    samples, captions = [], []
    for name, img, text in _tar_samples(paths, bad, "txt", "txt captions", lines):
        samples.append(Sample(name, -1, data=img))
        captions += [(Path(name), c) for c in text if c]
    return samples, captions


@dataclass
class LabelledSplit:
    """One labelled set: an ImageFolder directory or webdataset shards (a dir of tars or a glob)."""
    location: Path
    samples: list[Sample]
    classnames: list[str] | None       # None: shards, and no class names were given

    def drop_unknown_labels(self, num_classes: int, bad: BadImages) -> None:
        """Samples whose label is not a class index (negative, or num_classes and beyond) go to `bad`."""
        keep = []
        for s in self.samples:
            if 0 <= s.label < num_classes:
                keep.append(s)
            else:
                bad.add(s.name, ValueError(f"label {str(s.label)[:40]} is not one of the {num_classes} classes"))
        self.samples = keep

    @classmethod
    def open(cls, location: Path, classnames: list[str] | None, bad: BadImages) -> LabelledSplit:
        tars = sorted(location.glob("*.tar")) if location.is_dir() else shard_paths(location)
        if tars:
            return cls(location, webdataset_samples(tars, bad), classnames)
        samples, classnames = image_folder(location, classnames)
        return cls(location, samples, classnames)


def read_captions(path: Path, root: Path, bad: BadImages) -> list[tuple[Path, str]]:
    """(image path, caption) pairs from a jsonl of {"file": path relative to root (or root/val), "caption": str}.
    Malformed lines are reported with file:line and skipped."""
    pairs = []
    for lineno, line in enumerate(read_regular(path, MAX_LIST_BYTES, "a captions file").decode("utf-8", "replace")
                                  .splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            file, caption = rec["file"], rec["caption"]
            if not isinstance(file, str) or not isinstance(caption, str):
                raise ValueError("file and caption must be strings")
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            bad.items.append(f"{path}:{lineno}: malformed caption record ({type(e).__name__}: {e})")
            continue
        image = root / file
        if not image.exists() and (root / "val" / file).exists():  # paths relative to the val split
            image = root / "val" / file
        pairs.append((image, caption))
    return pairs


@dataclass
class EvalData:
    """The listing of one evaluation location (made once; images are decoded at each evaluation).

    - the demo layout: `train/` and `val/` (ImageFolder dirs or shard dirs), `classnames.json`,
      `templates.json`, `val_captions.jsonl`: `test` is val, `train` the probe's training split;
    - a single ImageFolder directory or shard dir/glob: `test` only.
    """
    location: str
    root: Path                         # where classnames.json, templates.json, val_captions.jsonl are looked up
    test: LabelledSplit
    train: LabelledSplit | None
    classnames: list[str]
    templates: list[str]               # zero-shot prompts, each with "{}"
    captions: list[tuple[Path, str]] | None
    bad: BadImages                     # problems found while listing

    @classmethod
    def open(cls, location: str | None, classnames: str | None = None, templates: str | None = None) -> EvalData:
        if location and is_clip_benchmark(Path(location)):
            return cls.open_clip_benchmark(Path(location), classnames, templates)
        return cls._open(location, classnames, templates)

    @classmethod
    def open_clip_benchmark(cls, root: Path, classnames: str | None = None, templates: str | None = None) -> EvalData:
        """A CLIP-benchmark webdataset folder, read as published: `test/` evaluated, `train/` (if
        there) for the probe; its class names and `{c}` templates unless files are given. A retrieval
        set (`dataset_type.txt`: retrieval) has captions instead of classes."""
        bad = BadImages()
        kind = read_lines(root / CLIP_BENCHMARK_TYPE, "a dataset type")[0] \
            if (root / CLIP_BENCHMARK_TYPE).is_file() else "classification"
        if kind == "retrieval":
            samples, captions = webdataset_captioned(split_shards(root / "test"), bad)
            return cls(str(root), root, LabelledSplit(root / "test", samples, []), None, [], [], captions, bad)
        if kind != "classification":
            raise ValueError(f"{root / CLIP_BENCHMARK_TYPE}: dataset type {kind!r} is not supported "
                             "(classification and retrieval are)")
        names = read_list(classnames, "class names") if classnames else \
            read_lines(root / CLIP_BENCHMARK_CLASSES, "class names")
        if templates:
            prompts = prompt_templates(read_list(templates, "templates"))
        elif (root / CLIP_BENCHMARK_TEMPLATES).is_file():
            prompts = prompt_templates(read_lines(root / CLIP_BENCHMARK_TEMPLATES, "templates"))
        else:
            prompts = imagenet_templates()
        test = LabelledSplit(root / "test", webdataset_samples(split_shards(root / "test"), bad), names)
        train = None
        if (root / "train" / "nshards.txt").is_file():
            train = LabelledSplit(root / "train", webdataset_samples(split_shards(root / "train"), bad), names)
        for split in (test, train):
            if split is not None:
                split.drop_unknown_labels(len(names), bad)
        return cls(str(root), root, test, train, names, prompts, None, bad)

    @classmethod
    def _open(cls, location: str | None, classnames: str | None = None, templates: str | None = None) -> EvalData:
        """List `location`; `classnames` / `templates` are JSON list files overriding the data's own
        (absent both: directory names, and the SLIP paper's ImageNet templates)."""
        if not location:
            raise ValueError("evaluation needs a data directory (EvalConfig.data)")
        given = Path(location)
        if not given.exists() and not glob.has_magic(str(location)):
            raise FileNotFoundError(f"{location}: no such evaluation data (expected a directory, an ImageFolder "
                                    "directory, or a shard file or glob)")
        root = given if given.is_dir() else given.parent
        bad = BadImages()
        names = find_classnames(root, classnames)
        has_splits = (root / "val").is_dir() and given.is_dir()
        test = LabelledSplit.open(given / "val" if has_splits else given, names, bad)
        train = LabelledSplit.open(given / "train", test.classnames, bad) \
            if has_splits and (given / "train").is_dir() else None
        if test.classnames is None:
            labels = {s.label for s in test.samples}
            raise ValueError(f"{location}: shards carry labels 0..{str(max(labels, default=-1))[:40]} but no "
                             "classnames.json was found (pass EvalConfig.classnames)")
        for split in (test, train):
            if split is not None:
                split.drop_unknown_labels(len(test.classnames), bad)
        tpl = Path(templates) if templates else root / "templates.json"
        prompts = prompt_templates(read_list(tpl, "templates")) if (templates or tpl.is_file()) \
            else imagenet_templates()
        cap = root / "val_captions.jsonl"
        captions = read_captions(cap, root, bad) if cap.is_file() else None
        return cls(str(location), root, test, train, test.classnames, prompts, captions, bad)


def is_clip_benchmark(root: Path) -> bool:
    """A CLIP-benchmark webdataset folder: `test/nshards.txt` (mandatory in that layout) under `root`."""
    return root.is_dir() and (root / "test" / "nshards.txt").is_file()


def read_lines(path: Path, what: str) -> list[str]:
    """Non-empty lines of a text file (class names, templates), stripped."""
    try:
        text = read_regular(path, MAX_LIST_BYTES, what).decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: cannot read {what} ({e})") from e
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no {what}")
    return lines


def split_shards(split: Path) -> list[Path]:
    """The shards `{split}/nshards.txt` announces, `0.tar` to `N-1.tar`; a missing one is an error naming it."""
    try:
        count = int(read_regular(split / "nshards.txt", 64, "a shard count").decode().strip())
    except (OSError, ValueError) as e:
        raise ValueError(f"{split / 'nshards.txt'}: not a shard count ({e})") from e
    paths = [split / f"{i}.tar" for i in range(count)]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"{missing[0]}: shard {missing[0].stem} of the {count} that "
                                f"{split / 'nshards.txt'} announces is missing")
    return paths


# ============================================================================ decoding in batches

class _ImageDataset(torch.utils.data.Dataset):
    def __init__(self, samples: Sequence[Sample], transform: EvalTransform):
        self.samples, self.transform = samples, transform

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        s = self.samples[i]
        try:
            return self.transform(_decode(s.data, s.path)), s.label, i, None
        except Exception as e:  # any decoding failure: report, skip, continue
            return None, s.label, i, f"{s.name}: {type(e).__name__}: {e}"


def _collate(items):
    return items


def iterate_images(samples: Sequence[Sample], transform: EvalTransform, batch_size: int, bad: BadImages,
                   desc: str = "images", progress: bool = True) -> Iterator[tuple[torch.Tensor, torch.Tensor, list[int]]]:
    """Batches (images, labels, sample indices) of the readable samples; unreadable ones go to `bad`."""
    loader = torch.utils.data.DataLoader(_ImageDataset(samples, transform), batch_size=batch_size,
                                         shuffle=False, collate_fn=_collate)
    with tqdm(total=len(samples), desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for items in loader:
            good = [it for it in items if it[0] is not None]
            for it in items:
                if it[0] is None:
                    bad.items.append(it[3])
            bar.update(len(items))
            if good:
                yield (torch.stack([g[0] for g in good]), torch.tensor([g[1] for g in good]),
                       [g[2] for g in good])
