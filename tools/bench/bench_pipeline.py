#!/usr/bin/env python
"""3-view images/s of our loader (both augmenters) against the SLIP reference data path, on the same shards.

    python tools/bench/bench_pipeline.py                       # synthetic 500x375 JPEG shards
    python tools/bench/bench_pipeline.py --manifest demo_run/data/shards/manifest.json --image-size 64
    python tools/bench/bench_pipeline.py --graphs     # graph only: our DALI graph vs a naive DALI graph

Every pipeline delivers what training consumes: a CLIP view and two SimCLR views per image,
normalised float tensors, and tokenised captions. The reference is PIL + torchvision-style
transforms in DataLoader workers (tools/bench/reference_pipeline.py); ours is pipeline/loader.py with
each of its two CPU paths: the DALI graph on the CPU ("dali-cpu") and pillow-simd ("pillow").
Each runs in its own process, in turn, for several rounds (a shared machine is noisy), and reports
wall-clock images/s and images per CPU-second (all threads and worker processes counted). On a
machine with CUDA the DALI GPU graph (nvJPEG "mixed" decoding) is measured too.

It also states what the loader's structural JPEG check (pipeline/jpeg_check.py, run on every image
as its batch is planned) costs: its time per image on the same shards, next to a full decode,
and as a percentage of each path's per-image augmentation time (CPU time per image) and of its
wall time per image (the budget of the one thread that plans batches).
"""
from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of processes (all their threads) from /proc."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / tick
        except OSError:
            pass
    return total


def synthetic_shards(out: Path, count: int, size: tuple[int, int]) -> Path:
    """Photo-like JPEGs (shapes, gradients, sensor noise) at quality 90, like a Flickr 'medium'."""
    import numpy as np
    from PIL import Image, ImageDraw

    from pipeline.shards import write_shard_set
    rng = np.random.default_rng(0)
    w, h = size
    samples = []
    for i in range(count):
        img = Image.new("RGB", (w, h), tuple(int(v) for v in rng.integers(0, 255, 3)))
        d = ImageDraw.Draw(img)
        for _ in range(12):
            x, y = int(rng.integers(0, w)), int(rng.integers(0, h))
            d.ellipse([x, y, x + int(rng.integers(10, w // 2)), y + int(rng.integers(10, h // 2))],
                      fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        a = np.asarray(img, np.int16) + rng.integers(-10, 10, (h, w, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        caption = f"photo {i} of some shapes on a coloured background"
        samples.append({"jpg": buf.getvalue(), "txt": caption,
                        "json": json.dumps({"title": caption, "description": f"number {i}"})})
    return write_shard_set(out, samples, max(8, count // 8), name="bench")   # 8 shards: every worker reads


def naive_graph(recipe, source, batch_size: int, num_threads: int):
    """The straightforward DALI translation of the recipe, for comparison: DALI's own random
    operators, `color_twist`, `hsv` for grey and `gaussian_blur` under conditionals."""
    from nvidia.dali import fn, pipeline_def, types

    from pipeline.dali_pipeline import input_names
    names, size = input_names(recipe), [recipe.image_size] * 2
    norm = dict(dtype=types.FLOAT, output_layout="CHW", mean=[255 * m for m in recipe.mean],
                std=[255 * s for s in recipe.std])
    r = recipe

    @pipeline_def(enable_conditionals=True)
    def graph():
        encoded = fn.external_source(source=source, num_outputs=len(names), batch=True)[0]
        img = fn.decoders.image(encoded, device="cpu", output_type=types.RGB)
        views = [fn.crop_mirror_normalize(fn.random_resized_crop(img, size=size, random_area=list(r.clip_scale)), **norm)]
        for _ in range(r.num_ssl_views):
            x = fn.random_resized_crop(img, size=size, random_area=list(r.ssl_scale))
            if fn.random.coin_flip(probability=r.jitter_prob):
                x = fn.color_twist(x, brightness=fn.random.uniform(range=[1 - r.brightness, 1 + r.brightness]),
                                   contrast=fn.random.uniform(range=[1 - r.contrast, 1 + r.contrast]),
                                   saturation=fn.random.uniform(range=[1 - r.saturation, 1 + r.saturation]),
                                   hue=fn.random.uniform(range=[-360 * r.hue, 360 * r.hue]))
            if fn.random.coin_flip(probability=r.grayscale_prob):
                x = fn.hsv(x, saturation=0.0)
            if fn.random.coin_flip(probability=r.blur_prob):
                x = fn.gaussian_blur(x, sigma=fn.random.uniform(range=list(r.blur_sigma)))
            views.append(fn.crop_mirror_normalize(x, mirror=fn.random.coin_flip(probability=r.flip_prob), **norm))
        return tuple(views)

    pipe = graph(batch_size=batch_size, num_threads=num_threads, device_id=None, exec_dynamic=True)
    pipe.build()
    return pipe


def graphs_only(args) -> dict:
    """DALI graph cost alone (inputs prepared beforehand): ours against the naive graph, alternating."""
    import dataclasses
    import math

    import numpy as np

    from pipeline.dali_pipeline import build_pipeline, dali_inputs
    from pipeline.loader import SLIPLoader
    from pipeline.manifest import load_manifest
    from pipeline.recipe import AugmentationRecipe
    from pipeline.tokenizer import Tokenizer
    recipe = dataclasses.replace(AugmentationRecipe(), image_size=args.image_size, antialias=not args.no_antialias)
    loader = SLIPLoader(load_manifest(args.manifest), recipe, args.batch_size, Tokenizer())
    inputs = [dali_inputs(loader.make_batch(0, s), recipe) for s in range(min(8, loader.steps_per_epoch))]
    count = [0]

    def source():
        count[0] += 1
        return inputs[count[0] % len(inputs)]

    pipes = {"ours": build_pipeline(recipe, source, args.batch_size, num_threads=args.threads),
             "naive": naive_graph(recipe, source, args.batch_size, args.threads)}
    runs = max(1, args.images // args.batch_size)
    results: dict[str, list[float]] = {k: [] for k in pipes}
    shapes: dict[str, list[list[int]]] = {}
    finite: dict[str, bool] = {}
    for name, p in pipes.items():
        for _ in range(max(1, args.warmup)):
            outs = p.run()
        views = [np.asarray(o.as_tensor()) for o in outs]    # what each graph made of its last batch
        shapes[name] = [list(v.shape) for v in views]
        finite[name] = all(bool(np.isfinite(v).all()) for v in views)
    for _ in range(args.rounds):
        for name, p in pipes.items():
            t0 = time.perf_counter()
            for _ in range(runs):
                p.run()
            results[name].append(runs * args.batch_size / (time.perf_counter() - t0))
    ours, naive = statistics.median(results["ours"]), statistics.median(results["naive"])
    ratio = ours / naive if naive > 0 else math.nan
    print(f"DALI graph only, {args.image_size}px, {args.threads} threads, median of {args.rounds} rounds: "
          f"ours {ours:.1f} images/s, naive {naive:.1f} images/s, ratio {ratio:.2f}x")
    return {"images_per_s": {"ours": ours, "naive": naive}, "ratio": ratio, "rounds": results,
            "view_shapes": shapes, "finite": finite}


def run_worker(args) -> dict:
    """One timed measurement in this process; prints a JSON line."""
    import dataclasses

    import torch

    from pipeline.manifest import load_manifest
    from pipeline.recipe import AugmentationRecipe
    from pipeline.tokenizer import Tokenizer
    torch.set_num_threads(1)    # the training process's threads belong to the model, not the data
    manifest = load_manifest(args.manifest)
    recipe = dataclasses.replace(AugmentationRecipe(), image_size=args.image_size,
                                 antialias=not args.no_antialias)
    tokenizer = Tokenizer()
    if args.worker == "reference":
        from reference_pipeline import reference_loader
        loader = reference_loader(manifest, recipe, args.batch_size, tokenizer, num_workers=args.threads)
    else:
        from pipeline.loader import SLIPLoader
        gpu = args.worker == "dali-gpu"
        loader = SLIPLoader(manifest, recipe, args.batch_size, tokenizer, num_threads=args.threads,
                            device="gpu" if gpu else "cpu", device_id=0 if gpu else None,
                            backend="pillow" if args.worker == "pillow" else "dali")

    def batches():
        while True:
            yield from loader

    stream = batches()
    for _ in range(args.warmup):
        next(stream)
    pids = [os.getpid()]
    iterator = getattr(loader, "_iterator", None)
    if iterator is not None:
        pids += [w.pid for w in getattr(iterator, "_workers", [])]
    cpu0, t0, images = cpu_seconds(pids), time.perf_counter(), 0
    while images < args.images:
        b = next(stream)
        images += b[0].shape[0] if isinstance(b, (list, tuple)) else b["clip_image"].shape[0]
    if args.worker == "dali-gpu":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, cpu_seconds(pids) - cpu0
    return {"pipeline": args.worker, "images": images, "seconds": wall, "cpu_seconds": cpu,
            "images_per_s": images / wall, "images_per_cpu_s": images / max(cpu, 1e-9), "cores_busy": cpu / wall}


def jpeg_check_cost(manifest_path: Path, images: int) -> dict:
    """Seconds per image of the structural JPEG check and of a full PIL decode, on the shards' images."""
    from PIL import Image

    from pipeline.jpeg_check import jpeg_problem
    from pipeline.manifest import load_manifest
    from pipeline.shards import SampleReader, build_sample_table
    reader = SampleReader(build_sample_table(load_manifest(manifest_path)))
    data = [d for d in (reader.image(i) for i in range(min(images, len(reader.table)))) if d is not None]
    reader.close()

    def per_image(fn, min_seconds: float) -> float:
        n, t0 = 0, time.perf_counter()
        while True:
            for d in data:
                fn(d)
            n += len(data)
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds:
                return elapsed / n

    check = per_image(jpeg_problem, 0.5)
    decode = per_image(lambda d: Image.open(io.BytesIO(d)).convert("RGB"), 0.5)
    return {"check_s": check, "full_decode_s": decode, "images": len(data)}


def check_share(cost: dict, med: dict) -> dict:
    """The check's time as a percentage of each path's CPU time and wall time per image."""
    return {name: {"cpu_percent": 100 * cost["check_s"] * v["images_per_cpu_s"],
                   "wall_percent": 100 * cost["check_s"] * v["images_per_s"]}
            for name, v in med.items() if name != "reference"}


def measure(args, worker: str) -> dict:
    cmd = [sys.executable, __file__, "--worker", worker, "--manifest", str(args.manifest), "--images",
           str(args.images), "--batch-size", str(args.batch_size), "--threads", str(args.threads),
           "--image-size", str(args.image_size), "--warmup", str(args.warmup)]
    if args.no_antialias:
        cmd.append("--no-antialias")
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"{worker} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--manifest", type=Path, help="shard manifest (default: generate synthetic shards)")
    p.add_argument("--synthetic-images", type=int, default=768)
    p.add_argument("--synthetic-size", default="500x375", help="WxH of the synthetic JPEGs")
    p.add_argument("--images", type=int, default=1536, help="images timed per round and pipeline")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2,
                   help="DALI threads = reference DataLoader workers")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--no-antialias", action="store_true",
                   help="recipe.antialias=False for both pipelines (DALI resize without antialiasing; "
                        "the reference's PIL resize always antialiases)")
    p.add_argument("--warmup", type=int, default=3, help="batches before timing")
    p.add_argument("--json", type=Path, help="also write the results here (with --graphs: speeds, ratio, view shapes)")
    p.add_argument("--graphs", action="store_true", help="compare DALI graphs only (ours vs naive), no loaders")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return 0
    import torch
    with tempfile.TemporaryDirectory() as tmp:
        if args.manifest is None:
            w, h = (int(v) for v in args.synthetic_size.split("x"))
            print(f"writing {args.synthetic_images} synthetic {w}x{h} JPEGs ...", flush=True)
            args.manifest = synthetic_shards(Path(tmp) / "shards", args.synthetic_images, (w, h))
        if args.graphs:
            result = graphs_only(args)
            if args.json:
                args.json.write_text(json.dumps(result, indent=1))
            return 0
        workers = ["pillow", "dali-cpu", "reference"] + (["dali-gpu"] if torch.cuda.is_available() else [])
        results: dict[str, list[dict]] = {k: [] for k in workers}
        for r in range(args.rounds):
            for worker in workers:
                res = measure(args, worker)
                results[worker].append(res)
                print(f"round {r + 1}/{args.rounds} {worker:10s} {res['images_per_s']:8.1f} images/s  "
                      f"{res['images_per_cpu_s']:7.1f} images/CPU-s  ({res['cores_busy']:.2f} cores busy)",
                      flush=True)
        cost = jpeg_check_cost(args.manifest, args.images)
    med = {k: {m: statistics.median(r[m] for r in v) for m in ("images_per_s", "images_per_cpu_s", "cores_busy")}
           for k, v in results.items()}
    ref = med["reference"]
    print(f"\n3-view images/s at {args.image_size}px, batch {args.batch_size}, {args.threads} threads/workers, "
          f"median of {args.rounds} rounds, {os.cpu_count()} cores")
    print(f"{'pipeline':12s} {'images/s':>10s} {'img/CPU-s':>10s} {'cores':>6s}")
    for k, v in med.items():
        print(f"{k:12s} {v['images_per_s']:10.1f} {v['images_per_cpu_s']:10.1f} {v['cores_busy']:6.2f}")
    summary = {}
    for name in ("pillow", "dali-cpu"):
        ours = med[name]
        summary[name] = {"wall_ratio": ours["images_per_s"] / ref["images_per_s"],
                         "per_core_ratio": ours["images_per_cpu_s"] / ref["images_per_cpu_s"]}
        print(f"{name} vs reference: {summary[name]['wall_ratio']:.2f}x images/s, "
              f"{summary[name]['per_core_ratio']:.2f}x images per CPU-second")
    share = check_share(cost, med)
    print(f"structural JPEG check: {cost['check_s'] * 1e6:.1f} us per image (a full PIL decode: "
          f"{cost['full_decode_s'] * 1e6:.0f} us), over {cost['images']} images")
    for name, v in share.items():
        print(f"  {name}: {v['cpu_percent']:.2f}% of its per-image augmentation time (CPU), "
              f"{v['wall_percent']:.2f}% of its wall time per image")
    jpeg_check = {"us_per_image": cost["check_s"] * 1e6, "full_decode_us_per_image": cost["full_decode_s"] * 1e6,
                  "images": cost["images"], "share": share}
    if args.json:
        args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "median": med,
                                         "rounds": results, "ratios": summary, "jpeg_check": jpeg_check}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
