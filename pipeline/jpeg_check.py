"""A structural check of JPEG files, cheap enough to run on every sample as its batch is planned.

Decoders disagree on damaged files: libjpeg in PIL rejects a file whose entropy-coded data is cut
off or garbled, while DALI's decoders fill in what is missing and return an image. To give both
augmentation paths the same batches, the loader rejects such files before either decoder sees
them, by one rule, without decoding: `jpeg_problem` walks the marker segments (each one's length
must stay inside the file, table segments must be well formed, a frame header must come before
the first scan) and scans each entropy-coded segment for the marker that ends it. A file passes
when it starts with the start-of-image marker, holds at least one scan, and its last scan's data
is followed by the end-of-image marker (bytes after it are ignored, as decoders ignore them).

It also refuses files with more scans than encoders write (`MAX_SCANS`): a progressive JPEG with
thousands of tiny scans is valid, but takes seconds to decode.

What this cannot see (entropy-coded data that is well framed but decodes to garbage) is left to
the decode-verification at build time (pipeline/build.py), and to the loader's handling of a
decoder that still fails later.
"""
from __future__ import annotations

import re

MAX_SCANS = 100    # libjpeg's progressive script writes 10 scans, mozjpeg's at most a few dozen

CORRUPT = "corrupt_image"
TOO_MANY_SCANS = "too_many_scans"

_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}      # frame headers (baseline .. lossless)
_APP = frozenset(range(0xE0, 0xF0))
_DHT, _DAC, _SOS, _DQT, _DNL, _DRI, _COM = 0xC4, 0xCC, 0xDA, 0xDB, 0xDC, 0xDD, 0xFE
_SOI, _EOI, _TEM = 0xD8, 0xD9, 0x01
# segments allowed after the first scan (more scans and the tables they use)
_BETWEEN_SCANS = frozenset({_DHT, _DAC, _SOS, _DQT, _DNL, _DRI, _COM}) | _APP
# segments allowed up to the frame header, and between it and the first scan (0xDE/0xDF: hierarchical mode)
_BEFORE_FRAME = frozenset({_DHT, _DAC, _DQT, _DRI, _COM, 0xDE, 0xDF}) | _APP | _SOF
_BEFORE_SCAN = _BEFORE_FRAME - _SOF | {_SOS}
# inside entropy-coded data 0xFF is followed by 0x00 (a stuffed byte), a restart marker (0xD0-0xD7)
# or another 0xFF (fill); anything else is the marker that ends the segment
_ENTROPY_END = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _tables_fit(data: bytes, start: int, end: int, marker: int) -> bool:
    """Whether a DHT or DQT segment's payload [start, end) is a whole number of well-formed tables."""
    p = start
    while p < end:
        if marker == _DHT:
            if p + 17 > end or data[p] >> 4 > 1 or data[p] & 0x0F > 3:
                return False
            count = sum(data[p + 1:p + 17])
            if count > 256:
                return False
            p += 17 + count
        else:
            precision = data[p] >> 4
            if precision > 1 or data[p] & 0x0F > 3:
                return False
            p += 1 + 64 * (1 + precision)
    return p == end


def jpeg_problem(data: bytes) -> tuple[str, str] | None:
    """None when `data` is a structurally complete JPEG, else (reason, what is wrong).

    The reason is `CORRUPT` ("corrupt_image") or `TOO_MANY_SCANS` ("too_many_scans"); the second
    item says where the structure breaks, for reports."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != _SOI:
        return CORRUPT, "no start-of-image marker"
    pos, scans, frame = 2, 0, False
    while True:
        if pos >= n:
            return CORRUPT, "file ends before the end-of-image marker"
        if data[pos] != 0xFF:
            return CORRUPT, f"no marker at byte {pos}"
        while pos < n and data[pos] == 0xFF:      # fill bytes may precede a marker
            pos += 1
        if pos >= n:
            return CORRUPT, "file ends before the end-of-image marker"
        marker = data[pos]
        pos += 1
        if marker == _EOI:
            return None if scans else (CORRUPT, "end-of-image marker before any scan")
        if marker == _TEM:
            continue
        if marker not in (_BETWEEN_SCANS if scans else _BEFORE_SCAN if frame else _BEFORE_FRAME):
            return CORRUPT, f"unexpected marker 0x{marker:02X} at byte {pos - 2}"
        if pos + 2 > n:
            return CORRUPT, "file ends inside a segment header"
        length = data[pos] << 8 | data[pos + 1]
        end = pos + length
        if length < 2 or end > n:
            return CORRUPT, f"segment 0x{marker:02X} at byte {pos - 2} runs past the end of the file"
        if marker in _SOF:
            components = data[pos + 7] if length > 7 else 0
            if components < 1 or length != 8 + 3 * components or (data[pos + 5] << 8 | data[pos + 6]) == 0:
                return CORRUPT, f"malformed frame header at byte {pos - 2}"
            frame = True
        elif marker == _SOS:
            components = data[pos + 2] if length > 2 else 0
            if not 1 <= components <= 4 or length != 6 + 2 * components:
                return CORRUPT, f"malformed scan header at byte {pos - 2}"
            scans += 1
            if scans > MAX_SCANS:
                return TOO_MANY_SCANS, f"more than {MAX_SCANS} scans"
            found = _ENTROPY_END.search(data, end)
            if found is None:
                return CORRUPT, f"entropy-coded data of scan {scans} runs to the end of the file"
            pos = found.start()
            continue
        elif marker in (_DHT, _DQT):
            if not _tables_fit(data, pos + 2, end, marker):
                return CORRUPT, f"malformed table segment 0x{marker:02X} at byte {pos - 2}"
        elif marker in (_DRI, _DNL) and length != 4:
            return CORRUPT, f"malformed segment 0x{marker:02X} at byte {pos - 2}"
        pos = end
