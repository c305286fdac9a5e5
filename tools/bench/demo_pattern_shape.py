#!/usr/bin/env python
"""Which half of a demo class each model gets right: pattern or shape.

    python tools/bench/demo_pattern_shape.py DEMO_RUN      # a finished `tools/demo.py --out DEMO_RUN`

The demo's classes are "<pattern> <shape>" (demokit/data.py). For every model of the run's
evaluation (SLIP, CLIP, the random encoder) it prints zero-shot top-1 on the held-out split and
the share of predictions whose pattern word, resp. shape word, is right (chance 25% each). It reads
the suite's cached image embeddings and zero-shot classifier (DEMO_RUN/eval/cache/<model>/heldout/)
and names each cache folder by the model whose per-image zero-shot outcomes in
DEMO_RUN/eval/results.json it reproduces, so nothing is recomputed.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))

from demokit.data import CLASSNAMES  # noqa: E402
from trainer.evaluation.zeroshot import zero_shot_accuracy  # noqa: E402


def shares(cache: Path) -> tuple[str, dict]:
    """(per-image outcome string, {top1, pattern, shape} in %) of one model's cached held-out encodings."""
    images = torch.load(cache / "heldout" / "test_images.pt", weights_only=False)["value"]
    classifier = torch.load(cache / "heldout" / "zeroshot_classifier.pt", weights_only=False)["value"]
    embed, labels = images["image_embed"].float(), images["labels"]
    scored = zero_shot_accuracy(embed, labels, classifier.float())     # as the suite scored it
    pred, truth = (embed @ classifier.float().T).argmax(1).tolist(), labels.tolist()
    words = [c.split() for c in CLASSNAMES]
    n = len(truth)
    return scored["top1_correct"], {
        "top1": scored["top1"],
        "pattern": 100 * sum(words[p][0] == words[t][0] for p, t in zip(pred, truth)) / n,
        "shape": 100 * sum(words[p][1] == words[t][1] for p, t in zip(pred, truth)) / n}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a tools/demo.py output folder")
    a = p.parse_args(argv)
    runs = json.loads((a.run / "eval" / "results.json").read_text())["runs"]
    outcomes = {r["heldout"]["zeroshot"]["top1_correct"]: name for name, r in runs.items()}
    print("| model | zero-shot top-1 | pattern right | shape right |\n| --- | --- | --- | --- |")
    for cache in sorted((a.run / "eval" / "cache").iterdir()):
        if not (cache / "heldout" / "test_images.pt").is_file():
            continue
        outcome, s = shares(cache)
        name = outcomes.get(outcome, f"{cache.name} (matches no model in results.json)")
        print(f"| {name} | {s['top1']:.1f} | {s['pattern']:.1f} | {s['shape']:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
