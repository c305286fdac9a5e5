"""The demo data set through the real CLI: generated YFCC-format inputs, loopback server, same pipeline."""
import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from demokit.data import CLASSNAMES, COLORS, SHAPES, draw
from pipeline.manifest import load_manifest

ROOT = Path(__file__).resolve().parent.parent


def dominant_class_color(img: Image.Image) -> str:
    """The demo colour whose pixels (saturated, close to it) are most numerous."""
    a = np.asarray(img.convert("RGB"), dtype=np.int32)
    counts = {c: int((np.abs(a - np.array(rgb)).sum(-1) < 90).sum()) for c, rgb in COLORS.items()}
    return max(counts, key=counts.get)


def test_demo_cli_builds_learnable_set(tmp_path):
    out = tmp_path / "demo"
    cmd = [sys.executable, "tools/build_yfcc15m.py", "--demo", "--out", str(out), "--demo-samples", "240",
           "--demo-eval-per-class", "2", "--shard-size", "100", "--no-progress"]
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = load_manifest(out / "shards" / "manifest.json")
    assert m.name == "demo" and load_manifest(out / "manifests" / "demo.json").total_samples == m.total_samples
    c = m.stats["select"]["counts"]
    for reason in ("malformed", "non_utf8", "duplicate_subset_id", "missing_from_metadata"):
        assert c[reason] >= 1, reason
    assert 200 <= m.total_samples <= 240 and len(m.shards) == 3 and all(p.exists() for p in m.index_paths())
    # every caption names the colour and shape that its image shows, cleaned of HTML and URLs
    words = re.compile(rf"\b({'|'.join(COLORS)})\b.*|.*\b({'|'.join(SHAPES)})\b", re.I)
    n = 0
    for tar in m.shard_paths():
        with tarfile.open(tar) as t:
            members = {x.name: x for x in t}
            for name in members:
                if not name.endswith(".txt"):
                    continue
                txt = t.extractfile(members[name]).read().decode()
                assert words.match(txt) and not re.search(r"<|>|http|www\.|&amp;|\n", txt), txt
                color = next(c for c in COLORS if re.search(rf"\b{c}\b", txt, re.I))
                img = Image.open(t.extractfile(members[name[:-3] + "jpg"]))
                assert dominant_class_color(img) == color, (name, txt)
                n += 1
    assert n == m.total_samples
    # the held-out labelled split
    ev = out / "eval"
    assert json.loads((ev / "classnames.json").read_text()) == CLASSNAMES == sorted(CLASSNAMES)
    assert len(CLASSNAMES) == 16
    assert all("{}" in t for t in json.loads((ev / "templates.json").read_text()))
    for split in ("train", "val"):
        assert sorted(p.name for p in (ev / split).iterdir()) == CLASSNAMES
        assert all(len(list((ev / split / cn).glob("*.jpg"))) == 2 for cn in CLASSNAMES)
    caps = [json.loads(line) for line in (ev / "val_captions.jsonl").read_text().splitlines()]
    assert len(caps) == 32 and all((ev / c["file"]).is_file() for c in caps)
    for c in caps:
        cls = Path(c["file"]).parent.name
        assert cls.split()[0] in c["caption"] and cls.split()[1] in c["caption"]
        assert dominant_class_color(Image.open(ev / c["file"])) == cls.split()[0]
    # rerunning the same command is a no-op that keeps the shards
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert load_manifest(out / "shards" / "manifest.json").shards == m.shards


def test_shapes_are_distinguishable():
    """Same colour, different shapes: the images differ in the shape's filled area profile."""
    import io
    areas = {}
    for s in SHAPES:
        a = np.asarray(Image.open(io.BytesIO(draw("red", s, 200, 200, seed=3))), dtype=np.int32)
        areas[s] = int((np.abs(a - np.array(COLORS["red"])).sum(-1) < 90).sum())
    assert len(set(areas.values())) == 4 and areas["star"] < areas["square"], areas
