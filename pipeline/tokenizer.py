"""CLIP byte-pair tokenizer, token-for-token equal to OpenCLIP's default tokenizer (mlfoundations/open_clip).

Written here from the published facts so that the runtime needs no model library: text is cleaned
(ftfy.fix_text, html.unescape twice, strip, whitespace collapse, lowercase), split with the CLIP
pre-tokenisation regex, mapped to printable unicode byte by byte, and merged with the first 48,894
BPE merges of ``bpe_simple_vocab_16e6.txt.gz``. Rows are ``[SOT, ids..., EOT, 0...]``.

Two robustness points:

* Long captions keep EOT in the last slot, as OpenCLIP does (the SLIP reference,
  facebookresearch/SLIP, truncates after adding EOT and so drops it, which breaks the text encoder's
  argmax-of-ids pooling).
* Deliberate difference from OpenCLIP: the literal strings ``<start_of_text>`` / ``<end_of_text>``
  inside a caption are ordinary text here. OpenCLIP's split regex also matches them and emits SOT/EOT
  ids mid-caption, so a user-typed "<end_of_text>" would move the pooled EOT feature. The split regex
  here has no such alternatives.

Speed: most YFCC captions are plain ASCII, where ftfy and html.unescape are provably no-ops; those
skip both. Ids are cached per space-separated chunk and BPE results per word, and long captions
are only split as far as the context needs.

Bounded cost whatever the caption: a caption is cut to its first ``MAX_CAPTION_CHARS`` characters
before anything else (every caption up to that length is tokenised exactly as OpenCLIP does), and
a long word (a pre-token of more than ``SHORT_WORD`` bytes: a run of letters without a space, a
long CJK sentence) is merged with a priority queue, which gives the same merges as the textbook
loop in O(n log n) instead of O(n^2). Words too long to be worth caching are not cached.
"""
from __future__ import annotations

import gzip
import heapq
import html
import re
from functools import lru_cache
from importlib import resources
from itertools import chain
from pathlib import Path
from typing import Iterable, Sequence

import ftfy
import regex
import torch

SOT = 49406
EOT = 49407
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
NUM_MERGES = VOCAB_SIZE - 2 * 256 - 2     # 48,894: CLIP uses exactly this many merge lines
VOCAB_FILE = "bpe_simple_vocab_16e6.txt.gz"
MAX_CAPTION_CHARS = 8192     # longer captions are cut to this many characters first (the builder keeps 1000 a field)
SHORT_WORD = 64               # bytes; longer words take the priority-queue merge
MAX_CACHED_KEY = 256          # characters; longer chunks and words are not cached

# CLIP's pre-tokenisation regex without the special-token alternatives (case-insensitive, `regex` for \p classes).
_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
_WS = regex.compile(r"\s+")   # same \s as the split regex, as OpenCLIP uses `regex` for both
# ASCII fast path. If a caption only has printable ASCII, tab and newline, and no '&' that could start
# an entity ("&amp;", "&#39;", "&copy"), then ftfy.fix_text and html.unescape leave it unchanged
# (nothing to decode, unescape, normalise or strip), and after whitespace collapsing the only \s left
# is ' ', so the split regex reduces to the stdlib pattern below. tests/test_tokenizer.py fuzzes this.
_NEEDS_FULL_CLEAN = re.compile(r"[^\t\n\x20-\x7e]|&[#0-9A-Za-z]")
_SPLIT_ASCII = re.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^ a-z0-9]+""")


def vocab_path() -> Path:
    """The vocabulary shipped as package data (pipeline/data, listed in pyproject.toml)."""
    return Path(str(resources.files("pipeline") / "data" / VOCAB_FILE))


def bytes_to_unicode() -> dict[int, str]:
    """Byte -> printable character table of GPT-2/CLIP BPE.

    Bytes that are printable Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the other
    68 bytes (controls, space, soft hyphen...) get chr(256 + k) in byte order, so no token string ever
    holds whitespace or a control character. The dict's order fixes the first 256 vocabulary ids.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    k = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + k)
            k += 1
    return table


def clean(text: str) -> str:
    """OpenCLIP's default cleaning: ftfy, html.unescape twice, strip, collapse whitespace, lowercase."""
    return " ".join(_chunks(text))


def _chunks(text: str, limit: int = -1) -> list[str]:
    """Space-separated pieces of the cleaned text; at most ``limit`` of them when ``limit >= 0``.

    No pre-token spans a space and the split regex never looks past one, so each chunk can be split
    (and cached) on its own. Every chunk gives at least one id, so the first ``limit`` chunks already
    fix the first ``limit`` ids: a long caption is not split past what the context can hold.
    Only the first ``MAX_CAPTION_CHARS`` characters of ``text`` are read.
    """
    text = text[:MAX_CAPTION_CHARS]
    if _NEEDS_FULL_CLEAN.search(text) is None:
        parts = text.lower().split(None, limit)     # str.split whitespace == regex \s on this alphabet
    else:
        text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
        text = _WS.sub(" ", text).strip().lower()
        parts = text.split(" ", limit) if text else []  # not split(): str.isspace() has \x1c-\x1f
    if 0 <= limit < len(parts):
        del parts[limit:]                           # the unsplit remainder
    return parts


def _pretokens(chunk: str) -> list[str]:
    """Split cleaned text into the words BPE runs on (the stdlib pattern is exact for ASCII)."""
    return (_SPLIT_ASCII if chunk.isascii() else _SPLIT).findall(chunk)


@lru_cache(maxsize=4)
def _load_tables(path: str) -> tuple[dict[str, int], tuple[str, ...], dict[tuple[str, str], int]]:
    """(token -> id, id -> token, merge pair -> rank), shared by every Tokenizer on this vocab file."""
    with gzip.open(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    # line 0 is the "#version" header; CLIP takes the next NUM_MERGES lines and ignores the rest
    merges = [tuple(line.split()) for line in lines[1:1 + NUM_MERGES]]
    if len(merges) != NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{path}: expected {NUM_MERGES} merge lines of two symbols")
    base = list(bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + ["<start_of_text>", "<end_of_text>"]
    encoder = {t: i for i, t in enumerate(tokens)}
    if len(encoder) != VOCAB_SIZE:
        raise ValueError(f"{path}: vocabulary has {len(encoder)} distinct tokens, expected {VOCAB_SIZE}")
    return encoder, tuple(tokens), {m: r for r, m in enumerate(merges)}


class _Cache(dict):
    """key -> tuple of ids, computed by ``fill`` on a miss. A dict subclass with __missing__ keeps
    hits entirely in C; when full it is simply cleared (bounded memory, frequent keys come back)."""

    def __init__(self, fill, max_size: int):
        super().__init__()
        self.fill, self.max_size = fill, max_size

    def __missing__(self, key: str) -> tuple[int, ...]:
        ids = self.fill(key)
        if len(key) > MAX_CACHED_KEY:     # rare, and each would hold its whole text
            return ids
        if len(self) >= self.max_size:
            self.clear()
        self[key] = ids
        return ids


class Tokenizer:
    """Callable CLIP tokenizer: ``Tokenizer()(texts, context_length=77) -> LongTensor[N, context_length]``.

    Two caches, each bounded by ``max_cache`` entries (each DataLoader worker has its own; about
    150 bytes an entry, so at most ~60 MB at the default): space-separated chunk -> ids, and
    pre-token -> BPE ids. Pickling drops the
    caches and the tables; the receiving process rebuilds them (tables are shared per process).
    """

    def __init__(self, vocab_file: str | Path | None = None, max_cache: int = 200_000):
        self.vocab_file = str(vocab_file) if vocab_file is not None else str(vocab_path())
        self.max_cache = max_cache
        self.encoder, self.decoder, self.ranks = _load_tables(self.vocab_file)
        self.merges = tuple(self.ranks)      # pair of each rank (the dict is in rank order)
        self.byte_encoder = bytes_to_unicode()
        self.byte_decoder = {c: b for b, c in self.byte_encoder.items()}
        self.bpe_cache = _Cache(self._bpe, max_cache)
        self.cache = _Cache(self._chunk_ids, max_cache)

    def __getstate__(self) -> dict:
        return {"vocab_file": self.vocab_file, "max_cache": self.max_cache}

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def _bpe(self, word: str) -> tuple[int, ...]:
        """Ids of one pre-token: byte-map it, then apply the lowest-ranked merge until none applies."""
        chars = "".join(self.byte_encoder[b] for b in word.encode("utf-8"))
        parts = [*chars[:-1], chars[-1] + "</w>"]
        if len(parts) > SHORT_WORD:
            return tuple(self.encoder[p] for p in self._merge_long(parts))
        ranks = self.ranks
        while len(parts) > 1:
            best, best_rank = None, NUM_MERGES
            for pair in zip(parts, parts[1:]):
                r = ranks.get(pair, NUM_MERGES)
                if r < best_rank:
                    best, best_rank = pair, r
            if best is None:
                break
            first, second = best
            merged, i, n = [], 0, len(parts)
            while i < n:        # merge every occurrence, left to right, without overlaps
                if i + 1 < n and parts[i] == first and parts[i + 1] == second:
                    merged.append(first + second)
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        return tuple(self.encoder[p] for p in parts)

    def _merge_long(self, parts: list[str]) -> list[str]:
        """The loop of `_bpe` for long words, with the same result: each round takes the lowest rank
        present and merges its occurrences left to right, skipping any that overlaps a merge just
        made. The symbols form a linked list; every adjacent pair with a rank waits in a heap keyed
        (rank, position). A merge creates a symbol longer than either half, so it never re-forms the
        pair being merged: a round's occurrences are exactly those present when it starts."""
        ranks, merges = self.ranks, self.merges
        n = len(parts)
        sym, nxt, prv = list(parts), list(range(1, n + 1)), list(range(-1, n - 1))   # nxt == n: the end
        heap = [(r, i) for i in range(n - 1) if (r := ranks.get((sym[i], sym[i + 1]))) is not None]
        heapq.heapify(heap)
        while heap:
            rank = heap[0][0]
            first, second = merges[rank]
            occurrences = []
            while heap and heap[0][0] == rank:
                occurrences.append(heapq.heappop(heap)[1])
            for i in sorted(occurrences):
                j = nxt[i]
                if sym[i] != first or j == n or sym[j] != second:
                    continue           # overlapped by a merge of this round, or stale
                sym[i], sym[j] = first + second, ""
                nxt[i] = nxt[j]
                if nxt[i] < n:
                    prv[nxt[i]] = i
                    if (r := ranks.get((sym[i], sym[nxt[i]]))) is not None:
                        heapq.heappush(heap, (r, i))
                if prv[i] >= 0 and (r := ranks.get((sym[prv[i]], sym[i]))) is not None:
                    heapq.heappush(heap, (r, prv[i]))
        out, i = [], 0
        while i < n:
            out.append(sym[i])
            i = nxt[i]
        return out

    def _chunk_ids(self, chunk: str) -> tuple[int, ...]:
        return tuple(chain.from_iterable(map(self.bpe_cache.__getitem__, _pretokens(chunk))))

    def _ids(self, chunks: list[str]) -> list[int]:
        return list(chain.from_iterable(map(self.cache.__getitem__, chunks)))

    def encode(self, text: str) -> list[int]:
        """BPE ids of a caption, without SOT/EOT and without truncation."""
        return self._ids(_chunks(text))

    def __call__(self, texts: str | Sequence[str], context_length: int = CONTEXT_LENGTH) -> torch.Tensor:
        """Rows ``[SOT, ids..., EOT]`` zero-padded to ``context_length``.

        A caption with more than ``context_length - 2`` ids keeps its first ones and EOT is forced into
        the last slot, so EOT (the largest id) is always present for argmax pooling.
        """
        if isinstance(texts, str):
            texts = [texts]
        if context_length < 1:
            raise ValueError(f"context_length must be >= 1, got {context_length}")
        budget = max(context_length - 2, 0)
        flat: list[int] = []
        for text in texts:
            ids = self._ids(_chunks(text, budget))     # exact for the first `budget` ids
            if len(ids) + 2 > context_length:
                row = [SOT, *ids[:context_length - 1]][:context_length]
                row[-1] = EOT                  # as OpenCLIP (context 1 gives [EOT])
            else:
                row = [SOT, *ids, EOT]
            flat += row
            flat += [0] * (context_length - len(row))
        return torch.tensor(flat, dtype=torch.long).view(len(texts), context_length)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of token ids: SOT is skipped, decoding stops at the first EOT (padding follows it).

        Word ends ('</w>') become single spaces, so this returns the cleaned caption with its
        pre-tokens separated by spaces (e.g. "it's" -> "it 's").
        """
        pieces = []
        for i in ids:
            i = int(i)
            if i == EOT:
                break
            if i != SOT:
                pieces.append(self.decoder[i])
        raw = bytes(self.byte_decoder[c] for c in "".join(pieces))
        return raw.decode("utf-8", errors="replace").replace("</w>", " ").strip(" ")
