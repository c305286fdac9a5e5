"""The pipeline's command-line tools run end to end on small real shards: previews and the benchmark."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from shard_testing import caption_sample, write_shards

ROOT = Path(__file__).resolve().parent.parent


def test_preview_sheets_show_every_view(tmp_path):
    rng = np.random.default_rng(0)
    samples = [caption_sample(rng.integers(0, 255, (60 + i, 80, 3)), f"a caption number {i}") for i in range(10)]
    manifest = write_shards(tmp_path / "shards", samples, per_shard=5)
    out = tmp_path / "previews"
    proc = subprocess.run([sys.executable, "tools/preview_augmentations.py", "--manifest", str(manifest),
                           "--out", str(out), "--num-samples", "6", "--per-sheet", "4", "--html",
                           "data.recipe.image_size=32", "model.image_size=32"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    sheets = sorted(out.glob("sheet_*.png"))
    assert len(sheets) == 2                               # 6 samples, 4 per sheet
    first = Image.open(sheets[0])
    assert first.width >= 4 * 192 and first.height > 4 * 192   # 4 columns, 4 rows of tiles
    html = (out / "index.html").read_text()
    assert "sheet_000.png" in html and "sheet_001.png" in html


def test_pipeline_benchmark_reports_a_ratio(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "tools/bench/bench_pipeline.py", "--synthetic-images", "32",
                           "--synthetic-size", "96x72", "--images", "32", "--rounds", "1", "--batch-size", "8",
                           "--image-size", "32", "--threads", "1", "--warmup", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "dali-cpu vs reference" in proc.stdout and "pillow vs reference" in proc.stdout
    result = json.loads(out.read_text())
    for name in ("pillow", "dali-cpu", "reference"):
        assert result["median"][name]["images_per_s"] > 0
    for name in ("pillow", "dali-cpu"):
        ratios = result["ratios"][name]
        assert ratios["wall_ratio"] > 0 and ratios["per_core_ratio"] > 0
    # the structural JPEG check's cost, per image and against each path's per-image time
    check = result["jpeg_check"]
    assert check["images"] == 32 and 0 < check["us_per_image"] < check["full_decode_us_per_image"]
    for name in ("pillow", "dali-cpu"):
        share = check["share"][name]
        assert 0 < share["cpu_percent"] < 100 and 0 < share["wall_percent"] < 100
    assert "structural JPEG check:" in proc.stdout and "% of its per-image augmentation time" in proc.stdout


def test_graph_benchmark_compares_with_the_naive_graph(tmp_path):
    out = tmp_path / "graphs.json"
    proc = subprocess.run([sys.executable, "tools/bench/bench_pipeline.py", "--graphs", "--synthetic-images", "16",
                           "--synthetic-size", "96x72", "--images", "16", "--rounds", "1", "--batch-size", "8",
                           "--image-size", "32", "--threads", "1", "--warmup", "1", "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    speeds = result["images_per_s"]
    assert speeds["ours"] > 0 and speeds["naive"] > 0
    assert math.isfinite(result["ratio"]) and result["ratio"] > 0
    assert math.isclose(result["ratio"], speeds["ours"] / speeds["naive"])
    # both graphs made every view of every image of a batch: 1 CLIP + 2 SimCLR, normalised float CHW
    for name in ("ours", "naive"):
        assert result["view_shapes"][name] == [[8, 3, 32, 32]] * 3, name
        assert result["finite"][name], name
    printed = re.search(r"ours ([\d.]+) images/s, naive ([\d.]+) images/s, ratio ([\d.]+)x", proc.stdout)
    assert printed and abs(float(printed.group(3)) - result["ratio"]) <= 0.0051
