"""Labelled image sets for the loader (finetuning): an ImageFolder tree or labelled webdataset shards.

- ImageFolder: `<root>/<class name>/<image>`; the class order is a `classnames.json` in the root or
  its parent if there is one (the demo's layout), else the sorted folder names.
- Labelled shards (the CLIP-benchmark layout): tars whose samples carry an image (`jpg`, `jpeg`,
  `png`, `webp`) and an integer label in `cls`; a directory of tars, a glob, or one tar.

Listing reads names and tar headers (and the few bytes of each `cls`), never an image; images are
read when a batch is planned, by the loader, which rejects the bad ones by the same rules as in
pretraining. Samples that cannot be used as listed (no image, no or unreadable label, a label that
is not a class index) are left out and counted by reason in `skipped`, never silently.
"""
from __future__ import annotations

import collections
import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.regular_files import is_regular, read_regular
from pipeline.shards import IMAGE_EXTS, MAX_IMAGE_BYTES, scan_tar

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_LABEL_BYTES = 64
MAX_CLASSNAMES_BYTES = 64 << 20


@dataclass
class LabelledSet:
    """Where every sample's image is, and its label. `files[i]` is a path (ImageFolder) or a tar
    with `spans[i]` = (offset, length) of the image inside it."""
    location: str
    labels: np.ndarray                    # int64 [N]
    files: list[Path]
    file_of: np.ndarray                   # int32 [N] index into files
    spans: np.ndarray                     # int64 [N, 2]; (0, -1) = the whole file
    names: list[str]                      # for reports
    classnames: list[str] | None = None
    skipped: collections.Counter = field(default_factory=collections.Counter)
    recorded_bad: dict[int, str] = field(default_factory=dict)   # the loader's interface; none here

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classnames) if self.classnames else int(self.labels.max()) + 1

    def image(self, i: int) -> bytes | None:
        """The encoded image, or None when it is gone, not a regular file or larger than the limit."""
        path, (offset, length) = self.files[int(self.file_of[i])], self.spans[i]
        try:
            if length < 0:
                return read_regular(path, MAX_IMAGE_BYTES, "image")
            if length > MAX_IMAGE_BYTES:
                return None
            fd = os.open(path, os.O_RDONLY)
            try:
                data = os.pread(fd, int(length), int(offset))
            finally:
                os.close(fd)
            return data if len(data) == length else None
        except (OSError, ValueError):      # missing, refused (FIFO, too large) or unreadable
            return None


def find_classnames(root: Path) -> list[str] | None:
    """A `classnames.json` (a JSON list of strings) or a CLIP-benchmark `classnames.txt` (one a
    line) in `root` or its parent, else None."""
    for folder in (root, root.parent):
        if (folder / "classnames.json").is_file():
            cand = folder / "classnames.json"
            value = json.loads(read_regular(cand, MAX_CLASSNAMES_BYTES, "class names"))
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ValueError(f"{cand}: class names must be a JSON list of strings")
            return value
        if (folder / "classnames.txt").is_file():
            text = read_regular(folder / "classnames.txt", MAX_CLASSNAMES_BYTES, "class names").decode("utf-8")
            return [line.strip() for line in text.splitlines() if line.strip()]
    return None


def tar_paths(location: str | Path) -> list[Path]:
    """The tars `location` names: a directory's `*.tar`, a glob, or one tar; [] if none."""
    p = Path(location)
    if p.is_dir():
        return sorted(p.glob("*.tar"))
    if p.suffix == ".tar" and p.exists():
        return [p]
    return sorted(Path(x) for x in glob.glob(str(location))) if glob.has_magic(str(location)) else []


def open_labelled(location: str | Path, classnames: list[str] | None = None,
                  num_classes: int | None = None) -> LabelledSet:
    """The labelled set at `location` (see the module docstring); labels outside the class names
    (or outside range(num_classes) where there are none) are left out and counted."""
    tars = tar_paths(location)
    if tars:
        found = _from_tars(str(location), tars)
    elif Path(location).is_dir():
        found = _from_folder(Path(location), classnames or find_classnames(Path(location)))
    else:
        raise FileNotFoundError(f"{location}: neither an ImageFolder directory nor labelled .tar shards")
    names = classnames or found.classnames
    if names is None and tars:      # labelled shards: class names beside them or one level up
        names = find_classnames(tars[0].parent)
    if names is not None or num_classes is not None:
        found.classnames = names
        keep = (found.labels >= 0) & (found.labels < (len(names) if names is not None else num_classes))
        if not keep.all():
            found.skipped["label_not_a_class"] += int((~keep).sum())
            found.labels, found.file_of, found.spans = found.labels[keep], found.file_of[keep], found.spans[keep]
            found.names = [n for n, k in zip(found.names, keep) if k]
    if not len(found):
        raise ValueError(f"{location}: no usable labelled images ({dict(found.skipped) or 'none found'})")
    return found


def _from_folder(root: Path, classnames: list[str] | None) -> LabelledSet:
    dirs = sorted(p.name for p in root.iterdir() if p.is_dir())
    classnames = classnames or dirs
    index = {c: i for i, c in enumerate(classnames)}
    unknown = [d for d in dirs if d not in index]
    if unknown:
        raise ValueError(f"{root}: class folders not in the class names: {unknown[:5]}")
    files = [p for d in dirs for p in sorted((root / d).iterdir())
             if p.suffix.lower() in IMAGE_SUFFIXES and is_regular(p)]
    labels = np.array([index[p.parent.name] for p in files], np.int64)
    n = len(files)
    return LabelledSet(str(root), labels, files, np.arange(n, dtype=np.int32),
                       np.tile(np.array([[0, -1]], np.int64), (n, 1)), [str(p) for p in files], classnames)


def _label(tar: Path, span: tuple[int, int]) -> int | str:
    """The integer in a `cls` member, or the reason there is none."""
    offset, length = span
    if length > MAX_LABEL_BYTES:
        return "label_unreadable"
    fd = os.open(tar, os.O_RDONLY)
    try:
        raw = os.pread(fd, length, offset)
    finally:
        os.close(fd)
    try:
        return int(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        return "label_unreadable"


def _from_tars(location: str, tars: list[Path]) -> LabelledSet:
    labels, file_of, spans, names, skipped = [], [], [], [], collections.Counter()
    for t, tar in enumerate(tars):
        samples, keys = scan_tar(tar)
        for comp, key in zip(samples, keys):
            image = next((comp[e] for e in IMAGE_EXTS if e in comp), None)
            label = _label(tar, comp["cls"]) if "cls" in comp else "no_label"
            if image is None:
                skipped["no_image"] += 1
            elif isinstance(label, str):
                skipped[label] += 1
            else:
                labels.append(label)
                file_of.append(t)
                spans.append(image)
                names.append(f"{tar}:{key}")
    return LabelledSet(location, np.array(labels, np.int64), list(tars), np.array(file_of, np.int32),
                       np.array(spans, np.int64).reshape(-1, 2), names, None, skipped)
