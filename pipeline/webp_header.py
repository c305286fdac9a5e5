"""The size of a WebP image from its RIFF header, without a WebP codec.

The Pillow build this project installs (pillow-simd) has no WebP codec, while DALI's decoders
decode WebP (on the CPU too). Shards made elsewhere may hold `webp` images (OpenCLIP, CLIP
benchmark sets), so the loader and tools/index_shards.py read a WebP image's size from its header
when Pillow cannot open it. Formats: simple lossy (`VP8 `), lossless (`VP8L`) and extended
(`VP8X`) files.
"""
from __future__ import annotations

import warnings

# Pillow warns on every WebP it cannot open; wherever that happens here the header is read instead.
# One process-wide filter for that message only: warnings.catch_warnings is not thread-safe, and
# images are checked in threads.
warnings.filterwarnings("ignore", "image file could not be identified because WEBP support not installed")


def is_webp(data) -> bool:
    """Whether `data` (bytes or a uint8 array, as a plan holds them) starts with a WebP RIFF header."""
    head = bytes(memoryview(data)[:12])
    return len(head) == 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP"


def webp_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a WebP image, or None when `data` is not one with a readable header."""
    if len(data) < 30 or not is_webp(data):
        return None
    chunk = data[12:16]
    if chunk == b"VP8 ":
        if data[23:26] != b"\x9d\x01\x2a":       # the key frame's start code
            return None
        w, h = int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    elif chunk == b"VP8L":
        if data[20] != 0x2F:
            return None
        bits = int.from_bytes(data[21:25], "little")
        w, h = (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    elif chunk == b"VP8X":
        w, h = int.from_bytes(data[24:27], "little") + 1, int.from_bytes(data[27:30], "little") + 1
    else:
        return None
    return (w, h) if w > 0 and h > 0 else None
