"""Write a large fake YFCC100M metadata file (25 columns, realistic field lengths) and a subset list
with a fraction of its photo ids, for measuring the builder's metadata scan.

    python tools/make_fake_metadata.py --rows 1000000 --out /tmp/fake [--bz2] [--subset-fraction 0.15]
"""
from __future__ import annotations

import argparse
import bz2
import random
from pathlib import Path
from urllib.parse import quote_plus

WORDS = ("sunset beach city street night bridge river dog cat flower tree mountain lake snow family party "
         "old new red blue green the a of in on at with my our from trip summer winter").split()


def fake_row(rnd: random.Random, n: int, pid: int, marker: str) -> str:
    title = quote_plus(" ".join(rnd.choices(WORDS, k=rnd.randint(0, 6))))
    desc = quote_plus(" ".join(rnd.choices(WORDS, k=rnd.choice((0, 0, 5, 20, 60)))))
    h = f"{rnd.getrandbits(128):032x}"
    f = [str(n), str(pid), h, "12345678@N00", "someone", "2010-07-04 12:00:00.0", "1278244800", "Canon+EOS+5D",
         title, desc, "tag,another+tag", "", "-122.41", "37.77", "16", f"http://www.flickr.com/photos/x/{pid}/",
         f"http://farm5.staticflickr.com/4/{pid}_{h[:10]}.jpg", "Attribution License",
         "http://creativecommons.org/licenses/by/2.0/", "4", "5", h[:10], h[10:20], "jpg", marker]
    return "\t".join(f) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--subset-fraction", type=float, default=0.15)   # YFCC15M is ~15% of YFCC100M
    p.add_argument("--bz2", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    rnd = random.Random(a.seed)
    a.out.mkdir(parents=True, exist_ok=True)
    meta = a.out / ("yfcc100m_dataset.bz2" if a.bz2 else "yfcc100m_dataset.tsv")
    subset = a.out / "yfcc100m_subset_data.tsv"
    opener = (lambda f: bz2.open(f, "wt", compresslevel=6)) if a.bz2 else (lambda f: open(f, "w"))
    with opener(meta) as m, open(subset, "w") as s:
        chunk, sub_n = [], 0
        for n in range(1, a.rows + 1):
            pid = 1_000_000 + n * 3
            chunk.append(fake_row(rnd, n, pid, "1" if rnd.random() < 0.008 else "0"))
            if rnd.random() < a.subset_fraction:
                sub_n += 1
                s.write(f"{sub_n}\t{pid}\t0\n")
            if len(chunk) == 10_000:
                m.write("".join(chunk))
                chunk.clear()
        m.write("".join(chunk))
    print(f"{meta} ({meta.stat().st_size / 1e6:.0f} MB, {a.rows:,} rows), {subset} ({sub_n:,} ids)")


if __name__ == "__main__":
    main()
