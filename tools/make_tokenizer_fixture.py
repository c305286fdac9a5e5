"""Write tests/fixtures/tokenizer_openclip.json: captions and the ids the real OpenCLIP tokenizer gives.

Run once, by hand, with `open-clip-torch` installed in a throwaway environment; it is NOT a runtime
or test dependency (the test only reads the JSON):

    python3 -m venv /tmp/ocvenv
    /tmp/ocvenv/bin/pip install torch==2.13.0 ftfy regex numpy
    /tmp/ocvenv/bin/pip install --no-deps open-clip-torch
    /tmp/ocvenv/bin/python tools/make_tokenizer_fixture.py

`import open_clip` needs torchvision; this script avoids it by loading only open_clip/tokenizer.py
by path and uses its default tokenizer (`tokenize`, context 77, `SimpleTokenizer.encode`).
The captions are fixed or drawn from a seeded RNG, so a rerun gives the same file.
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import importlib.util
import json
import random
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "fixtures" / "tokenizer_openclip.json"

FIXED = [
    # empty / whitespace
    "", " ", "   ", "\t", "\n", "\r\n", " \t\n\x0b\x0c\r ", "\u00a0", "\u3000", "\u2028\u2029", "\x85",
    # plain captions
    "a photo of a dog", "A Photo Of A Dog", "A PHOTO OF A DOG", "dog", "a", "I", "x y z",
    "Sunset over the lake, summer 2009", "IMG_1234.JPG", "DSC01234", "P1010001", "untitled",
    "my cat sleeping on the sofa :)", "the quick brown fox jumps over the lazy dog",
    "New York City skyline at night from the Brooklyn Bridge",
    # contractions and apostrophes
    "it's", "IT'S", "don't", "DON'T", "we're", "WE'RE", "they've", "I'm", "you'll", "he'd", "HE'D",
    "it's not what you'd think, we're sure they've said I'm fine and you'll see",
    "'s", "'t", "'re", "''s", "'''", "rock'n'roll", "o'clock", "the dogs' toys", "'quoted'", "it’s",
    "“smart quotes” and ‘single’ ones", "ma'am", "y'all'd've",
    # numbers and punctuation
    "2009", "3.14159", "1,000,000", "50% off!!!", "$19.99", "#hashtag @user", "...", "!!!???", "?!",
    "---===+++", "a--b", "a...b", "(parenthesised) [bracketed] {braced}", "~/path/to/file.txt",
    "C:\\Users\\photos\\img.jpg", "email: someone@example.com", "phone +1 (555) 123-4567",
    "10:45pm 2010-01-01", "1st 2nd 3rd 4th", "x^2 + y^2 = z^2", "<>", "</w>", "a</w>b", "_under_score_",
    "back`tick`s", "semi;colon", "pipe|pipe", "\\\\", "*****", "¯\\_(ツ)_/¯",
    # URLs
    "http://www.flickr.com/photos/someone/1234567890/", "https://example.com/a?b=c&d=e#frag",
    "www.example.org", "see http://t.co/AbC123 now", "ftp://files.example.net/pub/file.tar.gz",
    "<a href=\"http://www.flickr.com/groups/\" rel=\"nofollow\">flickr group</a>",
    # HTML entities and markup
    "&amp;", "&amp;amp;", "&amp;amp;amp;", "&amp;amp;amp;amp;", "rock &amp; roll", "Tom &amp;amp; Jerry",
    "it&#39;s", "don&#039;t", "&#x27;quoted&#x27;", "&quot;hello&quot;", "&lt;b&gt;bold&lt;/b&gt;",
    "&nbsp;non&nbsp;breaking", "caf&eacute;", "CAF&EACUTE;", "&eacute", "AT&T", "R&D dept", "& alone",
    "&#128512;", "&#0;", "&#xD800;", "&unknown;", "&amp;lt;b&amp;gt;", "<b>bold</b> <i>it</i>", "a<br/>b",
    "<p>para one</p>\n<p>para two</p>", "&copy; 2008 all rights reserved",
    # text that looks like HTML: ftfy leaves its entities alone, so both html.unescape passes matter
    "<b>Tom &amp;amp; Jerry</b>", "a < b &amp;amp; c", "<i>it&amp;#39;s</i>", "<br>&amp;quot;hi&amp;quot;",
    # case-insensitive contractions: long s (U+017F) case-folds to s
    "it'\u017f", "'\u017f", "'\u017ft", "IT'\u017f",
    # accents and other scripts
    "café", "naïve résumé", "Ångström", "Straße", "STRASSE", "İstanbul", "ΣΊΣΥΦΟΣ", "Οδυσσεύς",
    "Москва зимой", "日本語のテキスト", "東京タワー 2010", "中文字幕", "한국어 문장", "ภาษาไทย",
    "עברית", "العربية", "हिन्दी", "Tiếng Việt", "e\u0301", "n\u0303o", "ﬁsh ﬂour", "ｆｕｌｌｗｉｄｔｈ ＡＢＣ１２３",
    "Ⅻ ½ ² ①", "٣٤٥", "K", "ǅ", "µ", "ß", "ẞ", "Æsir", "œuvre", "ĳ",
    # emoji
    "🙂", "I ❤️ NY", "👍🏽 nice", "👨‍👩‍👧‍👦 family", "🇯🇵🇺🇸", "🔥🔥🔥 fire", "☕ coffee ☕", "✨sparkle✨",
    # mojibake (ftfy repairs these)
    "cafÃ©", "Ã¼ber", "donâ€™t", "â€œquotedâ€\u009d", "Ã¢â‚¬Ëœdoubly mangledÃ¢â‚¬â„¢", "soufflÃ©",
    "EspaÃ±a", "Ã\xa0 la carte", "IÃ±tÃ«rnÃ¢tiÃ´nÃ lizÃ¦tiÃ¸n",
    # control characters, odd whitespace, invisible characters
    "tab\tseparated\twords", "line one\nline two\n\nline four", "windows\r\nnewlines", "a\x00b", "\x1b[31mred\x1b[0m",
    "a\x1cb\x1dc\x1ed\x1ff", "\x07bell", "x\u200by", "zero\u200dwidth\u200cjoiner", "\ufeffbom", "soft\u00adhyphen",
    "a\ud800b", "trailing   ", "   leading", "  many    inner     spaces  ", "\u2003em\u2002space",
    "non\u00a0breaking\u00a0space", "\x7fdel",
]

# special-token strings are excluded: the SPEC regex has no special-token alternatives, OpenCLIP's has
# (see pipeline/tokenizer.py); the test covers them separately

WORDS = [
    "the", "a", "of", "and", "photo", "dog", "cat", "beach", "sunset", "mountain", "city", "street",
    "night", "tree", "flower", "garden", "wedding", "party", "birthday", "church", "bridge", "river",
    "Canon", "EOS", "Nikon", "D80", "HDR", "macro", "bokeh", "flickr", "explore", "interestingness",
    "IMG_0042", "2007", "2008", "12mm", "f/2.8", "1/250s", "ISO400", "100-400mm", "B&W", "b&amp;w",
    "don't", "it's", "we're", "I'm", "&amp;", "&#39;", "&quot;", "&lt;3", "http://flic.kr/p/7Kx9", "www.foo.com",
    "café", "München", "Zürich", "São Paulo", "東京", "北京", "서울", "Москва", "Ελλάδα", "🙂", "📷", "❤️", "🇫🇷",
    "cafÃ©", "â€™", "!!!", "...", "???", ":-)", "(c)", "#travel", "@friend", "--", "***", "½", "Ⅳ", "ﬁ",
    "Straße", "İzmir", "naïve", "ÉCOLE", "L'Oréal", "rock'n'roll", "9/11", "3.5", "100%", "$5", "€10", "£3",
]
SEPARATORS = [" ", " ", " ", " ", "  ", "\t", "\n", ", ", ". ", "-", "_", "", " / ", " | ", "\u00a0", "&nbsp;"]


def random_captions(rng: random.Random, n: int) -> list[str]:
    """Seeded mixtures of the pools above, with random case, separators and lengths."""
    out = []
    for _ in range(n):
        k = rng.choice([1, 2, 3, 5, 8, 12, 20, 40, 90])
        parts = []
        for _ in range(k):
            w = rng.choice(WORDS)
            w = rng.choice([w, w, w, w.upper(), w.capitalize()])
            parts += [w, rng.choice(SEPARATORS)]
        text = "".join(parts[:-1])
        if rng.random() < 0.2:
            text = rng.choice([" ", "\n", "  "]) + text + rng.choice([" ", "\n", "  "])
        out.append(text)
    return out


def long_descriptions(rng: random.Random, n: int) -> list[str]:
    """200-word YFCC-like descriptions: well over 77 tokens, so rows are truncated."""
    pool = [w for w in WORDS if w.isascii()] + ["walking", "along", "with", "my", "friends", "on", "in",
                                                  "we", "saw", "this", "beautiful", "old", "building"]
    out = []
    for i in range(n):
        words = [rng.choice(pool) for _ in range(200)]
        if i % 3 == 1:
            words[70] = "日本語の長いテキスト"
        if i % 3 == 2:
            words = [w.upper() for w in words]
        out.append(" ".join(words) + ".")
    return out


def captions() -> list[str]:
    rng = random.Random(20240601)
    caps = FIXED + random_captions(rng, 260) + long_descriptions(rng, 12)
    # exact-boundary lengths: 74, 75, 76 and 77 single-token words give rows that just fit / just overflow
    caps += [" ".join(["dog"] * k) for k in (74, 75, 76, 77)]
    caps += [" ".join(["a"] * 300), "x" * 2000, "日本" * 400, ("word " * 1000).strip(), "!" * 500]
    # long words that are single tokens: few ids per character, so the first 600 characters are not
    # enough for 75 ids (exercises the tokenizer's long-text shortcut falling back to the full text)
    caps += [" ".join(["photography"] * 100), " ".join(["international", "photographers", "celebration"] * 40),
             " ".join(["z" * 150] * 20), "a " * 40 + "photography " * 80]
    seen, unique = set(), []
    for c in caps:
        if c not in seen and "<start_of_text>" not in c.lower() and "<end_of_text>" not in c.lower():
            seen.add(c)
            unique.append(c)
    return unique


def load_openclip_tokenizer():
    """open_clip/tokenizer.py by path: `import open_clip` pulls torchvision, which is not needed here."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("open-clip-torch is not installed in this interpreter (see the module docstring)")
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("openclip_tokenizer", path)
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    return module, Path(spec.submodule_search_locations[0]) / "bpe_simple_vocab_16e6.txt.gz"


def dump(data: dict) -> str:
    """JSON with one case per line (reviewable diffs), pure ASCII (escapes keep odd characters visible)."""
    lines = []
    for key, value in data.items():
        if isinstance(value, list):
            items = ",\n".join(json.dumps(v, ensure_ascii=True) for v in value)
            lines.append(f"{json.dumps(key)}: [\n{items}\n]")
        else:
            lines.append(f"{json.dumps(key)}: {json.dumps(value)}")
    return "{\n" + ",\n".join(lines) + "\n}\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args()

    oc, vocab = load_openclip_tokenizer()
    simple = oc.SimpleTokenizer()          # OpenCLIP's default: this vocab, default cleaning, context 77
    cases = []
    for text in captions():
        row = oc.tokenize([text], context_length=77)[0].tolist()
        end = row.index(49407) + 1         # non-padded prefix: SOT ... EOT
        cases.append({"text": text, "encode": simple.encode(text), "row": row[:end]})
    short = []
    for text in ["a photo of a dog", "", "it's a long caption with many words in it", "日本語 🙂"]:
        for n in (1, 2, 3, 5):
            short.append({"text": text, "context_length": n, "row": oc.tokenize([text], context_length=n)[0].tolist()})
    data = {
        "generator": "tools/make_tokenizer_fixture.py",
        "open_clip_torch": importlib.metadata.version("open_clip_torch"),
        "ftfy": importlib.metadata.version("ftfy"),
        "regex": importlib.metadata.version("regex"),
        "vocab_sha256": hashlib.sha256(vocab.read_bytes()).hexdigest(),
        "context_length": 77,
        "cases": cases,
        "short_context": short,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(dump(data), encoding="ascii")
    print(f"wrote {len(cases)} captions + {len(short)} short-context rows to {args.out}")


if __name__ == "__main__":
    main()
