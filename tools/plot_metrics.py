#!/usr/bin/env python
"""Plot a training run's metrics.jsonl as PNGs: losses, learning rate, throughput, data-wait, and for
nCLIP / xCLIP the cluster usage and entropies.

    python tools/plot_metrics.py RUN_DIR [--out DIR]     # writes RUN_DIR/plots/*.png by default
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from pipeline.cli import run_main  # noqa: E402

PANELS = {
    "losses": lambda k: k == "loss" or k.endswith("_loss"),
    "lr": lambda k: k == "lr",
    "throughput": lambda k: k in ("images_per_s", "step_time"),
    "data_wait": lambda k: k == "data_wait",
    "mfu": lambda k: k == "mfu",
    "logit_scale": lambda k: k == "logit_scale",
    "grad_norm": lambda k: k == "grad_norm",
    "eval": lambda k: k.startswith("eval/"),
    # nCLIP collapse monitoring (docs/NCLIP.md): clusters used per global batch and per logging
    # window, and the batch-mean and per-sample entropies, per modality
    "nclip_clusters": lambda k: k.startswith("nclip_") and (k.endswith("_clusters_batch") or k.endswith("_clusters_window")),
    "nclip_entropy": lambda k: k.startswith("nclip_") and k.endswith("_entropy") and k != "nclip_batch_entropy",
}
LEGEND_PANELS = ("losses", "eval", "nclip_clusters", "nclip_entropy")


def read_metrics(path: Path) -> tuple[list[dict], list[str]]:
    """Periodic records (with a step and numbers) and the problems found, as file:line messages."""
    records, problems = [], []
    for i, line in enumerate(path.read_text().splitlines(), 1):
        try:
            rec = json.loads(line)
        except ValueError:
            problems.append(f"{path}:{i}: not JSON, skipped")
            continue
        if "event" not in rec and "step" in rec:
            records.append(rec)
    return records, problems


def plot(records: list[dict], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in records for k, v in r.items() if isinstance(v, (int, float))})
    written = []
    for panel, match in PANELS.items():
        series = [k for k in keys if match(k)]
        if not series:
            continue
        fig, axes = plt.subplots(len(series) if panel == "throughput" else 1, 1, figsize=(8, 3.2 * (len(series) if panel == "throughput" else 1)),
                                 squeeze=False)
        for i, key in enumerate(series):
            ax = axes[i if panel == "throughput" else 0][0]
            pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
            xs, ys = zip(*pts)
            if key == "data_wait":
                ys = [100 * y for y in ys]
            ax.plot(xs, ys, label=key, linewidth=1)
            ax.set_xlabel("step")
            label = key if (len(series) == 1 or panel == "throughput") else panel
            ax.set_ylabel({"data_wait": "data-wait %", "images_per_s": "images/s", "step_time": "s/step"}.get(key, label))
            ax.grid(alpha=0.3)
            if panel in LEGEND_PANELS:
                ax.legend()
        fig.suptitle(panel.replace("_", " "))
        fig.tight_layout()
        path = out / f"{panel}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="run directory (or a metrics.jsonl)")
    p.add_argument("--out", type=Path, help="output directory (default RUN/plots)")
    a = p.parse_args(argv)
    path = a.run if a.run.is_file() else a.run / "metrics.jsonl"
    if not path.exists():
        print(f"error: {path} not found", file=sys.stderr)
        return 2
    records, problems = read_metrics(path)
    for msg in problems:
        print(f"warning: {msg}", file=sys.stderr)
    if not records:
        print(f"error: {path} holds no step records", file=sys.stderr)
        return 2
    out = a.out or (path.parent / "plots")
    for f in plot(records, out):
        print(f)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
