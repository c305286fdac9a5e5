"""Throughput of batch tokenisation (captions/s) with a cold and a warm word cache, and its share of a step.

    python tools/bench/bench_tokenizer.py --captions 4000 --batch 256 --step-time 0.5

Captions are generated here, YFCC-like as they sit in the shards (pipeline/captions.py has already
removed URLs and tags and fixed entities): camera file names and short titles, sentences, long
multi-sentence descriptions with a literal "&", and about 15% non-ASCII text (accents, CJK, emoji),
which takes the slower ftfy path. --raw adds leftover HTML entities and mojibake (also ftfy path). "cold" is a fresh Tokenizer (tables loaded, empty word
cache) on one set; "warm" is a second, different set from the same distribution after that, so rare
words (numbers, names) still miss the cache as they would in training. The step share assumes the
captions of one step are tokenised serially in one process; loader workers split this between them.
With --openclip, OpenCLIP's tokenizer (if importable, e.g. in the fixture venv) is timed the same way.
"""
from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

COMMON = ("the a of and in on at with my our to from by for is was this that photo picture view old new "
          "beautiful little big red blue green white black light night day morning evening summer winter "
          "spring autumn sunset sunrise sky cloud clouds sea beach lake river mountain mountains hill tree "
          "trees flower flowers garden park street city town village house church bridge building tower "
          "road car train boat dog cat bird horse people friends family kids wedding party birthday "
          "christmas holiday trip travel vacation festival concert museum market restaurant food coffee "
          "snow rain water rock sand window door wall art graffiti portrait macro bokeh hdr black-and-white "
          "canon nikon sony lens taken walking looking near after during first last best great").split()
PROPER = ["London", "Paris", "New York", "Tokyo", "Berlin", "San Francisco", "Barcelona", "Amsterdam",
          "Yosemite", "Brooklyn", "Central Park", "Golden Gate", "Thames", "Seine", "Alps", "Rome"]
NON_ASCII = ["café", "München", "Zürich", "São Paulo", "Reykjavík", "東京タワー", "北京の夜", "서울 야경",
             "Москва", "Ελλάδα", "🙂", "📷", "❤️", "🇫🇷", "naïve", "Ñandú", "–", "“quoted”"]
RAW = ["&amp;", "&quot;", "it&#39;s", "cafÃ©", "donâ€™t", "&lt;3"]


def rare(rng: random.Random) -> str:
    """Tokens that keep missing a word cache: ids, numbers, user names."""
    return rng.choice([f"IMG_{rng.randrange(10000):04d}", f"DSC{rng.randrange(100000):05d}",
                       str(rng.randrange(1900, 2015)), f"{rng.randrange(1, 400)}mm", f"user{rng.randrange(10**6)}",
                       "".join(rng.choice("bcdfghklmnprstvz") + rng.choice("aeiou") for _ in range(rng.randint(2, 5)))])


def word(rng: random.Random) -> str:
    r = rng.random()
    if r < 0.80:
        return COMMON[min(int(rng.paretovariate(1.0)) - 1, len(COMMON) - 1) if rng.random() < 0.5
                      else rng.randrange(len(COMMON))]
    if r < 0.90:
        return rng.choice(PROPER)
    return rare(rng)


def caption(rng: random.Random, non_ascii: float = 0.15, raw: bool = False) -> str:
    kind = rng.random()
    if kind < 0.2:
        text = rare(rng) if rng.random() < 0.5 else " ".join(word(rng) for _ in range(rng.randint(1, 4)))
    elif kind < 0.75:
        text = " ".join(word(rng) for _ in range(rng.randint(5, 20))).capitalize() + rng.choice([".", "", "!", " :)"])
    else:
        parts = [" ".join(word(rng) for _ in range(rng.randint(8, 25))) for _ in range(rng.randint(2, 8))]
        text = ". ".join(p.capitalize() for p in parts)
        if rng.random() < 0.3:
            text = text.replace(" and ", " & ", 1) + " Taken with my " + word(rng)
    if rng.random() < non_ascii:
        words = text.split(" ")
        words.insert(rng.randrange(len(words) + 1), rng.choice(NON_ASCII))
        text = " ".join(words)
    if raw and rng.random() < 0.3:
        text = text + " " + rng.choice(RAW)
    return text


def timed(fn, captions: list[str], batch: int) -> float:
    t = time.perf_counter()
    for i in range(0, len(captions), batch):
        fn(captions[i:i + batch])
    return time.perf_counter() - t


def openclip_tokenize():
    import importlib.util
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        return None
    path = Path(spec.submodule_search_locations[0]) / "tokenizer.py"
    mod_spec = importlib.util.spec_from_file_location("openclip_tokenizer", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod.SimpleTokenizer()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--captions", type=int, default=4000)
    ap.add_argument("--batch", type=int, default=256, help="captions per training step (per process)")
    ap.add_argument("--step-time", type=float, default=0.5, help="seconds per training step")
    ap.add_argument("--non-ascii", type=float, default=0.15, help="share of captions with non-ASCII text")
    ap.add_argument("--raw", action="store_true", help="add leftover entities/mojibake to 30%% of captions")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--openclip", action="store_true", help="also time OpenCLIP's SimpleTokenizer if importable")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(1)
    from pipeline import tokenizer as tk

    rng = random.Random(args.seed)
    cold_set = [caption(rng, args.non_ascii, args.raw) for _ in range(args.captions)]
    warm_set = [caption(rng, args.non_ascii, args.raw) for _ in range(args.captions)]
    full = sum(tk._NEEDS_FULL_CLEAN.search(c) is not None for c in cold_set) / len(cold_set)
    chars = sum(map(len, cold_set)) / len(cold_set)

    t = time.perf_counter()
    tk._load_tables.cache_clear()
    tok = tk.Tokenizer()
    load = time.perf_counter() - t
    cold = timed(tok, cold_set, args.batch)
    words_after_cold = len(tok.cache)
    warm = timed(tok, warm_set, args.batch)
    again = timed(tok, warm_set, args.batch)

    print(f"{args.captions} captions per set, mean {chars:.0f} characters, {full:.0%} need ftfy (non-ASCII or entities)")
    print(f"vocabulary load: {load * 1e3:.0f} ms (once per process)")
    rows = [("cold cache", cold), ("warm cache (new captions)", warm), ("warm cache (same captions again)", again)]
    for name, secs in rows:
        rate = args.captions / secs
        per_step = args.batch / rate
        print(f"{name:34s} {rate:9.0f} captions/s  {per_step * 1e3:7.1f} ms per {args.batch} captions"
              f"  = {per_step / args.step_time:6.1%} of a {args.step_time:g} s step")
    print(f"caches: {words_after_cold} chunks after the cold set, {len(tok.cache)} chunks and "
          f"{len(tok.bpe_cache)} words after both")
    nocache = tk.Tokenizer(max_cache=1)                 # every chunk and word misses: the cost of BPE itself
    secs = timed(nocache, warm_set, args.batch)
    print(f"{'no cache (max_cache=1)':34s} {args.captions / secs:9.0f} captions/s")

    if args.openclip:
        oc = openclip_tokenize()
        if oc is None:
            print("open_clip not importable here; skipping the comparison")
        else:
            secs = timed(lambda caps: oc(caps, context_length=77), warm_set, args.batch)
            print(f"{'OpenCLIP SimpleTokenizer (warm)':34s} {args.captions / secs:9.0f} captions/s")


if __name__ == "__main__":
    main()
