#!/usr/bin/env python
"""Which change moved SLIP against CLIP on the demo: the images or the caption noise?

    python tools/bench/demo_caption_study.py [key=value ...] --out DIR [--seeds 0 1] [--epochs 7] [--samples 4000]
        [--design groups|structure]

key=value: shared overrides for both methods' training runs. The demo data's designs in
demokit/data.py (groups, the default, and structure) change two things at once against the colour
design: classes no longer defined by colour, and Flickr-noisy captions. This study holds the images
fixed and varies the captions: it builds the chosen design twice from the same data seed, once with
its noisy captions and once with clean ones (`--demo-clean-captions`: every title and description names the class exactly; the same
images, held-out split and bad rows), then trains SLIP and CLIP on each with the demo configs at
every training seed (`train.seed`), and evaluates every checkpoint on the same held-out images. Both
methods get the same shared settings (data, steps, model, batch, `--epochs` for both); neither
method's own hyperparameters are touched.

Per (captions, seed) it reports zero-shot and linear-probe top-1 of both, their difference and an
exact McNemar test on the same images (tools/demo.py `mcnemar`), then the mean difference per
caption setting. The clean arm against the colour design's numbers (`make demo`) shows what the
images did; noisy against clean shows what the caption noise did. Writes OUT/results.json and
OUT/study.md; rerunning skips every run and evaluation already done (delete OUT/<arm>/ to redo it),
and refuses an OUT whose data or training settings (OUT/settings.json) differ from the command's.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
METHODS = ("slip", "clip")
CAPTIONS = ("noisy", "clean")


def _demo_tool():
    spec = importlib.util.spec_from_file_location("demo_tool", ROOT / "tools" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module        # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def run(cmd: list[str], log: Path) -> float:
    """One tool through its command line, output to `log`; a failure ends the study with the log's tail."""
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(ROOT)}
    t0 = time.time()
    with open(log, "w") as f:
        f.write(" ".join(cmd) + "\n")
        f.flush()
        rc = subprocess.call(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT)
    if rc != 0:
        sys.exit(f"{cmd[1]} failed (exit {rc}); log {log}:\n" + "\n".join(log.read_text().splitlines()[-10:]))
    return time.time() - t0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="training seeds (train.seed)")
    p.add_argument("--epochs", type=float, default=7, help="optim.epochs for both methods (the demo's: 7)")
    p.add_argument("--samples", type=int, default=4000, help="demo training rows (the demo's: 4000)")
    p.add_argument("--eval-per-class", type=int, default=40, help="held-out images per class (the demo's: 40)")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--design", choices=("groups", "structure"), default="groups",
                   help="the demo data design (tools/build_yfcc15m.py --demo-design; the demo's: groups)")
    p.add_argument("overrides", nargs="*", help="key=value for both methods' training runs (shared settings only)")
    a = p.parse_args(argv)
    demo = _demo_tool()
    py, out = sys.executable, a.out.resolve()
    results: dict = {"settings": {"seeds": a.seeds, "epochs": a.epochs, "samples": a.samples,
                                  "eval_per_class": a.eval_per_class, "data_seed": a.data_seed, "design": a.design,
                                  "overrides": a.overrides}, "runs": {}}
    # what the builds and runs under OUT depend on (seeds may be added on a rerun)
    fixed = {k: v for k, v in results["settings"].items() if k != "seeds"}
    marker = out / "settings.json"
    if marker.is_file() and json.loads(marker.read_text()) != fixed:
        sys.exit(f"{out} holds a study with other settings ({marker}: {marker.read_text().strip()}); "
                 f"this command's: {json.dumps(fixed)}. Use another --out.")
    out.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(fixed) + "\n")
    for captions in CAPTIONS:
        data = out / captions / "data"
        build = [py, "tools/build_yfcc15m.py", "--demo", "--demo-design", a.design, "--out", str(data),
                 "--demo-samples", str(a.samples),
                 "--demo-eval-per-class", str(a.eval_per_class), "--demo-seed", str(a.data_seed), "--no-progress"]
        if captions == "clean":
            build.append("--demo-clean-captions")
        if not (data / "shards" / "manifest.json").is_file():
            print(f"[{captions}] build", flush=True)
            run(build, out / captions / "logs" / "build.log")
    # seed by seed, both caption settings each time: a study cut short still pairs its arms
    for seed in a.seeds:
        for captions in CAPTIONS:
            data = out / captions / "data"
            for method in METHODS:
                key = f"{captions}/seed{seed}/{method}"
                run_dir, ev = out / captions / f"seed{seed}" / method, out / captions / f"seed{seed}" / f"eval_{method}.json"
                if not ev.is_file():
                    print(f"[{key}] train", flush=True)
                    t_train = run([py, "trainer/run.py", "--config", f"trainer/configs/demo_{method}.yaml",
                                   f"out_dir={run_dir}", f"data.manifest={data / 'shards' / 'manifest.json'}",
                                   f"eval.data={data / 'eval'}", "eval.every_steps=0", f"train.seed={seed}",
                                   f"optim.epochs={a.epochs}", "checkpoint.every_steps=1000", *a.overrides],
                                  run_dir.parent / f"train_{method}.log")
                    print(f"[{key}] evaluate ({t_train:.0f}s training)", flush=True)
                    run([py, "tools/evaluate.py", "--checkpoint", str(demo.final_checkpoint(run_dir)),
                         "--data", str(data / "eval"), "--out", str(ev), "--tasks", "zeroshot,linear_probe"],
                        run_dir.parent / f"eval_{method}.log")
                r = json.loads(ev.read_text())
                results["runs"][key] = {"zeroshot": r["zeroshot"], "linear_probe": r["linear_probe"],
                                        "train_steps": demo.train_steps(run_dir)}
                results["pairs"] = pairs(demo, results["runs"], a.seeds)
                (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    results["pairs"] = pairs(demo, results["runs"], a.seeds)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    md = study_markdown(results)
    (out / "study.md").write_text(md + "\n")
    print(md)
    return 0


def pairs(demo, runs: dict, seeds: list[int]) -> list[dict]:
    """Per caption setting and seed: SLIP minus CLIP on both tasks, with the paired test."""
    rows = []
    for captions in CAPTIONS:
        for seed in seeds:
            s, c = runs.get(f"{captions}/seed{seed}/slip"), runs.get(f"{captions}/seed{seed}/clip")
            if s is None or c is None:
                continue
            row = {"captions": captions, "seed": seed, "steps": s["train_steps"]}
            for task in ("zeroshot", "linear_probe"):
                row[task] = {"slip": s[task]["top1"], "clip": c[task]["top1"],
                             "delta": s[task]["top1"] - c[task]["top1"],
                             "mcnemar": demo.mcnemar(s[task].get("top1_correct"), c[task].get("top1_correct"))}
            rows.append(row)
    return rows


def study_markdown(results: dict) -> str:
    st = results["settings"]
    lines = [f"Demo caption study ({st.get('design', 'structure')} design): {st['samples']} training rows, {st['epochs']:g} epochs, held-out "
             f"{16 * st['eval_per_class']} images, training seeds {', '.join(map(str, st['seeds']))}"
             + (f", both methods with {' '.join(st['overrides'])}" if st.get("overrides") else "") + ".", "",
             "| captions | seed | steps | zero-shot SLIP | CLIP | SLIP-CLIP | McNemar p | probe SLIP | CLIP | SLIP-CLIP | McNemar p |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in results["pairs"]:
        z, lp = r["zeroshot"], r["linear_probe"]
        pz = z["mcnemar"]["p_two_sided"] if z["mcnemar"] else float("nan")
        pl = lp["mcnemar"]["p_two_sided"] if lp["mcnemar"] else float("nan")
        lines.append(f"| {r['captions']} | {r['seed']} | {r['steps']} | {z['slip']:.1f} | {z['clip']:.1f} | "
                     f"{z['delta']:+.1f} | {pz:.2g} | {lp['slip']:.1f} | {lp['clip']:.1f} | {lp['delta']:+.1f} | {pl:.2g} |")
    lines.append("")
    for captions in CAPTIONS:
        rs = [r for r in results["pairs"] if r["captions"] == captions]
        if rs:
            mz = sum(r["zeroshot"]["delta"] for r in rs) / len(rs)
            ml = sum(r["linear_probe"]["delta"] for r in rs) / len(rs)
            lines.append(f"- {captions} captions: mean SLIP-CLIP zero-shot {mz:+.1f}, linear probe {ml:+.1f} points "
                         f"over {len(rs)} seed(s)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
