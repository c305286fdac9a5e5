"""The CLIP tokenizer against ids produced once by the real OpenCLIP tokenizer (tests/fixtures, made by
tools/fixtures/make_tokenizer_fixture.py), plus the layout, truncation, decoding and packaging contracts."""
from __future__ import annotations

import hashlib
import html
import json
import pickle
import random
from importlib import resources
from pathlib import Path

import ftfy
import pytest
import regex
import torch

from pipeline import tokenizer as tk
from pipeline.tokenizer import EOT, SOT, VOCAB_SIZE, Tokenizer

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "tokenizer_openclip.json").read_text(encoding="ascii"))
CASES = FIXTURE["cases"]
TEXTS = [c["text"] for c in CASES]
CLIP_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)
LONG = " ".join(["photograph"] + ["of the old stone bridge over the river at sunset"] * 20)   # 201 words


def full_clean(text: str) -> str:
    """OpenCLIP's cleaning spelled out, without the ASCII shortcut."""
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer()


def test_fixture_is_substantial():
    assert FIXTURE["context_length"] == 77 and len(CASES) >= 300
    assert sum(len(c["encode"]) > 75 for c in CASES) >= 10          # truncated rows are covered
    assert any(c["text"] == "" for c in CASES) and any("&amp;amp;" in c["text"] for c in CASES)


def test_matches_openclip_token_for_token(tok):
    batch = tok(TEXTS)
    assert batch.shape == (len(CASES), 77) and batch.dtype == torch.long
    mismatches = []
    for i, case in enumerate(CASES):
        row = batch[i].tolist()
        n = len(case["row"])
        if tok.encode(case["text"]) != case["encode"] or row[:n] != case["row"] or any(row[n:]):
            mismatches.append(case["text"][:60])
    assert not mismatches, f"{len(mismatches)} captions differ from OpenCLIP, e.g. {mismatches[:5]!r}"


def test_small_context_lengths_match_openclip(tok):
    for case in FIXTURE["short_context"]:
        assert tok(case["text"], context_length=case["context_length"])[0].tolist() == case["row"], case


def test_layout_sot_eot_padding(tok):
    out = tok(["a photo of a dog", "", "It's 2009!"])
    assert out.shape == (3, 77) and out.dtype == torch.long
    assert out[0, :7].tolist() == [SOT, 320, 1125, 539, 320, 1929, EOT] and not out[0, 7:].any()
    assert out[1, :2].tolist() == [SOT, EOT] and not out[1, 2:].any()
    for row in out:
        eot = row.tolist().index(EOT)
        assert row[0] == SOT and row.argmax() == eot and not row[eot + 1:].any()
        assert SOT not in row[1:eot].tolist() and EOT not in row[1:eot].tolist()
    assert tok("a photo of a dog").shape == (1, 77)                     # a single str is a batch of one
    assert tok("a photo of a dog", context_length=10).shape == (1, 10)
    assert int(out.max()) < VOCAB_SIZE == len(tok.decoder) == 49408


def test_long_caption_keeps_eot_in_last_slot(tok):
    assert len(LONG.split()) == 201 and len(tok.encode(LONG)) > 200
    row = tok(LONG)[0]
    assert row[0] == SOT and row[76] == EOT and int(row.argmax()) == 76
    assert row[1:76].tolist() == tok.encode(LONG)[:75]                 # first 75 ids kept, rest dropped
    assert (row[1:76] != 0).all()
    # the SLIP reference bug (truncating after adding SOT/EOT) would leave a word piece in slot 76
    assert tok.encode(LONG)[75] != EOT


def test_batch_equals_single_calls(tok):
    sample = TEXTS[::7] + [LONG]
    batch = tok(sample)
    singles = torch.cat([tok(t) for t in sample])
    assert torch.equal(batch, singles)
    assert torch.equal(tok(sample, context_length=20), torch.cat([tok(t, context_length=20) for t in sample]))


def test_decode_round_trips_normalised_text(tok):
    assert tok.decode(tok.encode("  A Photo\tof my  DOG &amp; CAT  ")) == "a photo of my dog & cat"
    assert tok.decode(tok.encode("It's café 日本語 🙂")) == "it 's café 日本語 🙂"
    for text in TEXTS:
        expected = " ".join(CLIP_SPLIT.findall(full_clean(text)))
        assert tok.decode(tok.encode(text)) == expected, text
    row = tok("a photo of a dog")[0]
    assert tok.decode(row) == tok.decode(row.tolist()) == "a photo of a dog"    # stops at EOT, no padding


def test_special_token_strings_are_plain_text(tok):
    """Deliberate difference from OpenCLIP: a typed "<end_of_text>" must not put EOT mid-caption."""
    row = tok("a <end_of_text> b <start_of_text>")[0].tolist()
    assert row.count(EOT) == 1 and row.count(SOT) == 1 and row[0] == SOT
    assert tok.decode(row) == "a < end _ of _ text > b < start _ of _ text >"


def test_ascii_shortcut_equals_full_cleaning():
    """The ftfy/regex shortcut for plain ASCII must give exactly what the full path gives."""
    rng = random.Random(7)
    pool = [chr(i) for i in range(32, 127)] + ["\t", "\n", "'s", "'re", "  ", "& ", "&&", "&;", "&-", "&\n"]
    fast = 0
    for _ in range(4000):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 30)))
        if tk._NEEDS_FULL_CLEAN.search(text) is not None:
            continue
        fast += 1
        cleaned = tk.clean(text)
        assert cleaned == full_clean(text), repr(text)
        assert tk._pretokens(cleaned) == CLIP_SPLIT.findall(cleaned), repr(text)
    assert fast > 2000
    assert tk.clean("rock & roll &&; a&-b &") == "rock & roll &&; a&-b &"    # no entity: shortcut is fine
    for text in ["a &amp; b", "&lt", "&#39;", "&copy 2008", "caf\u00e9", "a\x00b", "a\x1cb", "x\ry"]:  # full path
        assert tk._NEEDS_FULL_CLEAN.search(text) is not None and tk.clean(text) == full_clean(text)


def test_cache_is_bounded_and_pickling_is_light(tok):
    small = Tokenizer(max_cache=16)
    words = [f"w{i}x" for i in range(200)]
    assert small.encode(" ".join(words)) == tok.encode(" ".join(words))
    assert 0 < len(small.cache) <= 16 and 0 < len(small.bpe_cache) <= 16
    blob = pickle.dumps(small)
    assert len(blob) < 2000                                           # tables and cache are rebuilt, not shipped
    clone = pickle.loads(blob)
    assert clone.max_cache == 16 and torch.equal(clone(TEXTS[:50]), tok(TEXTS[:50]))


def test_vocab_ships_as_package_data(tok):
    data = resources.files("pipeline") / "data" / "bpe_simple_vocab_16e6.txt.gz"
    assert data.is_file()
    assert hashlib.sha256(data.read_bytes()).hexdigest() == FIXTURE["vocab_sha256"]
    assert Path(tok.vocab_file).resolve() == Path(str(data)).resolve()
    assert (Path(tk.__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz").is_file()
    pyproject = (Path(tk.__file__).parents[1] / "pyproject.toml").read_text()
    assert 'pipeline = ["data/*"]' in pyproject


def test_long_words_merge_as_the_textbook_loop_does(tok, monkeypatch):
    """Words longer than SHORT_WORD bytes take the priority-queue merge; it must give the loop's ids."""
    rng = random.Random(11)
    pieces = ["the", "ing", "ion", "er", "an", "ss", "a", "aa", "ee", "ll", "é", "日", "本", "語", "🙂", "q", "!", "?"]
    words = ["".join(rng.choice(pieces) for _ in range(rng.randint(30, 400))) for _ in range(150)]
    words += ["a" * 500, "ab" * 300, "aab" * 200, "日本語" * 100, "!" * 300]
    fast = [tok._bpe(w) for w in words]
    monkeypatch.setattr(tk, "SHORT_WORD", 10 ** 9)           # every word through the loop
    assert fast == [Tokenizer()._bpe(w) for w in words]


def test_hostile_captions_cost_little_and_captions_under_the_cap_are_untouched(tok):
    import time
    start = time.time()
    rows = tok(["".join(random.Random(i).choice("abcdefghij") for _ in range(20_000)) for i in range(8)]
               + ["日本語" * 7000, "a" * 30_000])
    assert time.time() - start < 5 and rows.shape == (10, 77)
    assert all(len(k) <= tk.MAX_CACHED_KEY for k in tok.bpe_cache)       # long words are not kept
    long = " ".join(["stone bridge"] * 2000)                  # 25,999 characters
    assert len(long) > tk.MAX_CAPTION_CHARS
    assert torch.equal(tok(long), tok(long[:tk.MAX_CAPTION_CHARS]))
    assert tok.encode(long) == tok.encode(long[:tk.MAX_CAPTION_CHARS])
