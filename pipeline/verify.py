"""Verification of a finished shard, once, at build time: its index matches the tar, its images decode.

A full decode costs too much in the loader's hot path (every image, every epoch, one feeder
thread), but once per image when a shard is made it is cheap next to downloading it. The images
that fail are recorded in the manifest (`ShardEntry.bad_samples`, see manifests/README.md) and
the loader skips them without reading them. The rule for an image is the loader's structural
JPEG check (pipeline/jpeg_check.py) plus a full PIL decode.
"""
from __future__ import annotations

import io
import tarfile
import warnings
from pathlib import Path

from PIL import Image

from pipeline.jpeg_check import CORRUPT, jpeg_problem
from pipeline.shards import IMAGE_EXTS, MAX_IMAGE_BYTES, index_members, iter_tar_samples, parse_index, read_index

NOT_AN_IMAGE = "not_an_image"
TOO_LARGE = "too_large"
MAX_DETAIL = 160          # characters of a decoder's message kept in the manifest


def image_problem(data: bytes, max_pixels: int) -> tuple[str, str] | None:
    """None when `data` opens as an image, passes the structural check if it is a JPEG, and decodes
    fully; else (reason, what went wrong). Images above `max_pixels` are not decoded: the loader
    applies its own size limit."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError as e:    # a header claiming far more pixels than PIL allows
            return TOO_LARGE, _detail(e)
        except Exception as e:   # PIL raises many types for garbage; all mean "not an image"
            return NOT_AN_IMAGE, _detail(e)
        if img.format == "JPEG" and (problem := jpeg_problem(data)) is not None:
            return problem
        if img.size[0] * img.size[1] > max_pixels:
            return None
        try:
            img.convert("RGB")
        except Exception as e:   # and as many for a damaged one
            return CORRUPT, _detail(e)
    return None


def _detail(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"[:MAX_DETAIL]


def verify_images(tar: Path, max_pixels: int = 89_478_485) -> list[dict]:
    """The samples of `tar` whose image fails `image_problem`, in the manifest's `bad_samples` form:
    {"position": the sample's place in the tar, "key", "reason", "detail"}. Samples without an
    image are left to the loader (it sees that without reading anything); images larger than
    `MAX_IMAGE_BYTES` are not read."""
    bad = []
    with tarfile.open(tar) as tf:
        for position, (key, parts) in enumerate(iter_tar_samples(tf)):
            member = next((parts[e] for e in IMAGE_EXTS if e in parts), None)
            if member is None:
                continue
            if member.size > MAX_IMAGE_BYTES:
                problem = TOO_LARGE, f"{member.size} bytes, more than the {MAX_IMAGE_BYTES} read for an image"
            else:
                problem = image_problem(tf.extractfile(member).read(), max_pixels)
            if problem is not None:
                bad.append({"position": position, "key": key, "reason": problem[0], "detail": problem[1]})
    return bad


def _indexed(name: str) -> bool:
    """Whether DALI's indexer lists a member of this name (it skips names whose key is empty)."""
    dot = name.find(".", name.rfind("/") + 1)
    base = name[:dot]
    return bool(base) and not base.endswith("/")


def index_matches(idx: Path, tar: Path) -> bool:
    """Whether the wds2idx index `idx` lists exactly the regular members of `tar`, at their offsets
    and sizes and under their names (an index kept from an earlier tar of the same name need not)."""
    try:
        lines = read_index(idx, tar.stat().st_size).decode("utf-8", "replace").splitlines()
        parse_index(lines, idx, tar.stat().st_size)
        listed = [member for line in lines[1:] for member in index_members(line)]
    except (OSError, ValueError, IndexError):
        return False
    with tarfile.open(tar) as tf:
        actual = [(m.offset_data, m.size, m.name) for m in tf if m.isreg() and _indexed(m.name)]
    return listed == actual

