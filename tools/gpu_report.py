#!/usr/bin/env python
"""One command that checks and measures the GPU path, and writes report.md and report.json.

    python tools/gpu_report.py --out gpu_report              # CUDA machine: at most 4 minutes
    python tools/gpu_report.py --out gpu_report --full       # + ViT-S/16, ViT-L/16, CLIP, xCLIP
    python tools/gpu_report.py --out gpu_report --parts agreement,train_compiled   # rerun some parts

Parts (each in its own process, time-boxed: a part that fails or overruns is recorded, the rest
runs; a part whose dependencies are missing is skipped, with the reason):
- environment: driver, GPU, torch, DALI, nvJPEG, the packages the other parts need;
- train / train_compiled: SLIP ViT-B/16 bf16 training at the recipe's per-GPU batch (64: 4096 over
  64 GPUs, which is what the MFU target refers to), eager and with torch.compile: images/s, MFU
  against the detected GPU's peak (trainer/flops.py), peak torch memory;
- agreement: the DALI GPU graph against the DALI CPU graph on every batch of one epoch;
- dali_graph: batches held across later runs stay unchanged (buffer lifetime), the graph is
  deterministic, batches consumed on a side stream are complete (stream-ordered hand-off);
- end_to_end: the DALI GPU loader feeding the ViT-B/16 step: images/s, data-wait, peak GPU memory
  (torch's and the rest: DALI's pool, nvJPEG, the CUDA context);
- pipeline_bench: tools/bench/bench_pipeline.py's rows, dali-gpu beside pillow, the DALI CPU graph
  and the reference;
- hw_decoder: the graph alone at `hw_decoder_load` 0, 0.75 and 1, with the JPEG engine's load where
  `nvidia-smi dmon` reports it: whether the hardware decoder is used;
- max_batch: the largest per-GPU ViT-B/16 SLIP batch, doubling from 64 then bisecting (bounded);
- gpu_tests: the tests marked `gpu`;
- dead_peer: on two or more GPUs, an NCCL all-reduce whose peer was SIGKILLed, and one whose peer
  is frozen, end within `dist.timeout_s` (tools/dead_peer_check.py; the suite runs it with gloo).
Inputs are synthetic 500x375 JPEG shards (tools/bench/bench_pipeline.py). Without CUDA the parts
that can run on the CPU run small (a smoke run, not a measurement: under 2 minutes) and the
GPU-only parts are listed as skipped.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools" / "bench"))     # bench_pipeline, bench_train (not a package)

from pipeline.files import write_json_atomic  # noqa: E402  (stdlib only: safe on a bare GPU machine)
from pipeline.cli import run_main  # noqa: E402

CONFIGS = ROOT / "trainer" / "configs"
VIEWS = ["clip_image", "ssl_image_1", "ssl_image_2"]
GPU_BUDGET_S, CPU_BUDGET_S, FULL_BUDGET_S = 240, 110, 900
MIN_PART_S = 10          # a part is not started with less time than this left
RECIPE_BATCH = 64        # per GPU: the SLIP recipe's 4096 over 64 GPUs
TARGET_IMAGES_PER_S, TARGET_MFU, TARGET_DATA_WAIT = 3000, 0.40, 0.05
DEPENDENCIES = {"dali": "nvidia.dali", "ftfy": "ftfy", "webdataset": "webdataset", "pytest": "pytest"}


@dataclass(frozen=True)
class Part:
    name: str
    title: str
    seconds: int                       # time box
    needs: tuple[str, ...] = ()        # keys of DEPENDENCIES
    gpu_only: bool = True              # False: runs small on a machine without CUDA
    shards: bool = False               # reads the synthetic shards
    full_only: bool = False
    min_gpus: int = 1


# In the order they run: the slow compile last, so that a short window measures everything else.
PARTS = [
    Part("train", "SLIP ViT-B/16 training, bf16, batch 64 per GPU, eager", 60, gpu_only=False),
    Part("agreement", "DALI GPU graph vs CPU graph, every batch of one epoch", 45, ("dali",), shards=True),
    Part("dali_graph", "DALI graph: buffer lifetime, determinism, side-stream hand-off", 40, ("dali",),
         gpu_only=False, shards=True),
    Part("end_to_end", "DALI GPU loader feeding ViT-B/16 SLIP: data-wait, peak GPU memory", 60, ("dali", "ftfy"),
         gpu_only=False, shards=True),
    Part("pipeline_bench", "bench_pipeline.py rows: pillow, dali-cpu, reference, dali-gpu", 75, ("dali", "ftfy"),
         gpu_only=False, shards=True),
    Part("hw_decoder", "hardware JPEG decoder: hw_decoder_load 0 / 0.75 / 1", 45, ("dali",), shards=True),
    Part("max_batch", "largest per-GPU ViT-B/16 SLIP batch (bounded search)", 45),
    Part("gpu_tests", "the tests marked gpu", 90, ("dali", "pytest")),
    Part("dead_peer", "NCCL: a collective whose peer died or froze ends within dist.timeout_s", 60, min_gpus=2),
    Part("train_compiled", "SLIP ViT-B/16 training as in train, under torch.compile", 120),
    Part("train_slip_s16", "SLIP ViT-S/16 training, bf16, batch 64", 60, full_only=True),
    Part("train_slip_l16", "SLIP ViT-L/16 training, bf16, batch 64", 90, full_only=True),
    Part("train_clip_b16", "CLIP ViT-B/16 training, bf16, batch 64", 60, full_only=True),
    Part("train_xclip_b16", "xCLIP ViT-B/16 training, bf16, batch 64", 60, full_only=True),
]
TRAIN_CONFIGS = {"train": ("slip_vit_b16", False), "train_compiled": ("slip_vit_b16", True),
                 "train_slip_s16": ("slip_vit_s16", False), "train_slip_l16": ("slip_vit_l16", False),
                 "train_clip_b16": ("clip_vit_b16", False), "train_xclip_b16": ("xclip_vit_b16", False)}


# ---------------------------------------------------------------- what runs

def available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def select_parts(names: list[str] | None, full: bool) -> list[Part]:
    known = {p.name: p for p in PARTS}
    if names:
        unknown = [n for n in names if n not in known]
        if unknown:
            raise SystemExit(f"unknown part(s) {unknown}; choose from {sorted(known)}")
        return [known[n] for n in names]
    return [p for p in PARTS if full or not p.full_only]


def skip_reason(part: Part, gpu: bool, deps: dict[str, bool], remaining_s: float,
                gpus: int | None = None) -> str | None:
    """Why `part` does not run here (None: it runs). `gpus`: how many CUDA devices there are, if known."""
    if part.gpu_only and not gpu:
        return "no CUDA device"
    if part.gpu_only and gpus is not None and gpus < part.min_gpus:
        return f"needs {part.min_gpus} CUDA devices, {gpus} here"
    missing = [n for n in part.needs if not deps.get(n)]
    if missing:
        return "not installed: " + ", ".join(DEPENDENCIES[n] for n in missing)
    if remaining_s < MIN_PART_S:
        return f"the run's time budget is spent (rerun with --parts {part.name})"
    return None


# ---------------------------------------------------------------- running a part in its own process

def run_part(part: Part, ctx: dict, timeout_s: float, out: Path) -> dict:
    """Run `part` in a child process with a time box; its record, whatever happened to it."""
    record_path, log_path = out / "parts" / f"{part.name}.json", out / "parts" / f"{part.name}.log"
    record_path.unlink(missing_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--part", part.name,
           "--ctx", json.dumps({**ctx, "seconds": timeout_s})]
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=ROOT)
        try:
            rc = proc.wait(timeout=timeout_s)
            status = "ok" if rc == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)     # the part and the workers it started
            proc.wait()
            status = "timeout"
    seconds = time.perf_counter() - t0
    record = json.loads(record_path.read_text()) if record_path.exists() else {}
    results = record.get("results", {})
    error = record.get("error")
    if status != "ok" and not error:
        error = log_path.read_text()[-3000:] or f"exit without a record (status {status})"
    if status == "timeout":
        error = f"ran past its time box of {timeout_s:.0f} s; results so far are kept\n" + (error or "")
    return {"title": part.title, "status": status, "seconds": round(seconds, 1), "results": results,
            "error": error, "reason": None}


class Recorder:
    """A part's results, rewritten to its JSON file at every update: a part killed at its time box
    keeps what it had measured."""

    def __init__(self, path: Path):
        self.path, self.results = path, {}

    def __setitem__(self, key: str, value) -> None:
        self.results[key] = value
        self.save()

    def update(self, values: dict) -> None:
        self.results.update(values)
        self.save()

    def save(self, error: str | None = None) -> None:
        write_json_atomic(self.path, {"results": self.results, "error": error}, indent=1, default=str)


def child(name: str, ctx: dict) -> int:
    """The child process of one part."""
    rec = Recorder(Path(ctx["out"]) / "parts" / f"{name}.json")
    rec.save()
    ctx = SimpleNamespace(**ctx)
    try:
        fn = train_part if name in TRAIN_CONFIGS else PART_FUNCTIONS[name]
        fn(name, ctx, rec)
    except BaseException:     # noqa: BLE001  the record must say why, whatever it was
        rec.save(error=traceback.format_exc()[-4000:])
        return 1
    return 0


# ---------------------------------------------------------------- helpers the parts share

def char_tokens(captions, context_length: int = 77):
    """A tokenizer without ftfy for the graph-only parts (their captions are not looked at)."""
    import numpy as np
    out = np.zeros((len(captions), context_length), np.int64)
    for i, c in enumerate(captions):
        ids = [ord(ch) for ch in c][:context_length]
        out[i, :len(ids)] = ids
    return out


def torch_device(ctx):
    import torch
    return torch.device("cuda", ctx.device_id) if ctx.gpu else torch.device("cpu")


def gpu_memory(device) -> dict:
    """Peak torch memory and what the whole device has in use (torch's, DALI's pool, nvJPEG, context)."""
    import torch
    if device.type != "cuda":
        return {}
    free, total = torch.cuda.mem_get_info(device)
    gib = 2 ** 30
    return {"torch_peak_allocated_gib": torch.cuda.max_memory_allocated(device) / gib,
            "torch_peak_reserved_gib": torch.cuda.max_memory_reserved(device) / gib,
            "device_used_gib": (total - free) / gib, "device_total_gib": total / gib}


def recipe_for(ctx):
    import dataclasses

    from pipeline.recipe import AugmentationRecipe
    return dataclasses.replace(AugmentationRecipe(), image_size=ctx.image_size)


def graph_loader(ctx, device: str, batch_size: int | None = None, seed: int = 0):
    from pipeline.loader import SLIPLoader
    from pipeline.manifest import load_manifest
    gpu = device == "gpu"
    return SLIPLoader(load_manifest(ctx.manifest), recipe_for(ctx), batch_size or ctx.batch_size, char_tokens,
                      seed=seed, num_threads=ctx.threads, device=device, device_id=ctx.device_id if gpu else None,
                      backend="dali")


def load_run_config(name: str, overrides: list[str]):
    from trainer.config import load_config
    return load_config(CONFIGS / f"{name}.yaml", overrides)


def smoke_overrides(ctx) -> list[str]:
    """The CPU smoke run: the demo's tiny model, a few samples."""
    return ["data.batch_size=4", "train.precision=fp32", f"train.torch_threads={ctx.threads}"]


# ---------------------------------------------------------------- the parts

def train_part(name: str, ctx, rec: Recorder) -> None:
    import torch
    from bench_train import compute_throughput
    config, compiled = TRAIN_CONFIGS[name]
    device = torch_device(ctx)
    if ctx.gpu:
        cfg = load_run_config(config, [f"data.batch_size={RECIPE_BATCH}", "train.precision=bf16",
                                       f"train.compile={compiled}"])
        steps, rounds, warmup = 10, 2, 3
    else:
        cfg = load_run_config("demo_slip", smoke_overrides(ctx))
        steps, rounds, warmup = 1, 1, 1
        rec["smoke"] = "CPU smoke run of the demo's tiny model: not a measurement"
    rec.update({"config": config if ctx.gpu else "demo_slip", "compile": cfg.train.compile,
                "precision": cfg.train.precision, "batch_size": cfg.data.batch_size})
    result, _ = compute_throughput(cfg, device, steps, rounds, warmup, baseline=False)
    rec.update(result)
    rec.update(gpu_memory(device))


def part_agreement(name: str, ctx, rec: Recorder) -> None:
    from pipeline.dali_pipeline import graph_agreement
    cpu, gpu = graph_loader(ctx, "cpu"), graph_loader(ctx, "gpu")
    rec["steps_per_epoch"] = len(cpu)
    rec.update(graph_agreement(cpu, gpu, VIEWS))
    rec["bad_samples"] = {"cpu": cpu.bad_samples, "gpu": gpu.bad_samples,
                          "gpu_reasons": dict(gpu.bad_reasons)}


def part_dali_graph(name: str, ctx, rec: Recorder) -> None:
    import contextlib

    import torch
    device = "gpu" if ctx.gpu else "cpu"
    rec["device"] = device
    held = [{k: b[k] for k in VIEWS} for b in graph_loader(ctx, device)]
    kept = [{k: v.clone() for k, v in h.items()} for h in held]
    side = torch.cuda.Stream(ctx.device_id) if ctx.gpu else None
    again = []
    with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
        # a second epoch, consumed on a side stream without any explicit synchronisation
        for b in graph_loader(ctx, device):
            again.append({k: (b[k] * 1).cpu() for k in VIEWS})
    if ctx.gpu:
        torch.cuda.synchronize(ctx.device_id)
    rec["batches"] = len(held)
    rec["held_batches_unchanged"] = all(torch.equal(h[k], c[k]) for h, c in zip(held, kept) for k in VIEWS)
    rec["distinct_buffers"] = len({h[k].data_ptr() for h in held for k in VIEWS}) == len(held) * len(VIEWS)
    diffs = [float((h[k].cpu() - a[k]).abs().max()) for h, a in zip(held, again) for k in VIEWS]
    rec["deterministic"] = all(torch.equal(h[k].cpu(), a[k]) for h, a in zip(held, again) for k in VIEWS)
    rec["max_diff_between_runs"] = max(diffs) if diffs else None


def part_end_to_end(name: str, ctx, rec: Recorder) -> None:
    import torch
    from bench_train import end_to_end, make_trainer
    device = torch_device(ctx)
    if ctx.gpu:
        cfg = load_run_config("slip_vit_b16", [f"data.manifest={ctx.manifest}", f"data.batch_size={RECIPE_BATCH}",
                                               "train.precision=bf16", "data.device=gpu",
                                               f"data.num_threads={ctx.threads}"])
        steps, warmup = 30, 5
    else:
        cfg = load_run_config("demo_slip", smoke_overrides(ctx) + [f"data.manifest={ctx.manifest}",
                                                                   "data.device=cpu", f"data.num_threads={ctx.threads}"])
        steps, warmup = 2, 1
        rec["smoke"] = "CPU smoke run: the DALI CPU loader feeding the demo's tiny model"
    torch.manual_seed(cfg.train.seed)
    trainer = make_trainer(cfg, device, baseline=False, state=None)
    before = gpu_memory(device)
    rec.update({"config": "slip_vit_b16" if ctx.gpu else "demo_slip", "batch_size": cfg.data.batch_size,
                "data_device": cfg.data.device, "steps": steps})
    rec.update(end_to_end(cfg, trainer, device, steps, warmup))
    after = gpu_memory(device)
    if after:
        rec["memory"] = after
        # what is not torch's: DALI's pool and nvJPEG's buffers (the CUDA context was there before)
        rec["memory"]["not_torch_gib"] = (after["device_used_gib"] - after["torch_peak_reserved_gib"]
                                          - (before["device_used_gib"] - before["torch_peak_reserved_gib"]))


def part_pipeline_bench(name: str, ctx, rec: Recorder) -> None:
    import bench_pipeline
    args = SimpleNamespace(manifest=Path(ctx.manifest), image_size=ctx.image_size, batch_size=ctx.batch_size,
                           threads=ctx.threads, no_antialias=False,
                           images=1536 if ctx.gpu else 16, warmup=3 if ctx.gpu else 1)
    workers = ["dali-gpu"] if ctx.gpu else []
    workers += ["pillow", "dali-cpu"] + (["reference"] if ctx.deps.get("webdataset") else [])
    rows: dict[str, dict] = {}
    if not ctx.deps.get("webdataset"):
        rows["reference"] = {"skipped": "not installed: webdataset"}
    for worker in workers:
        try:
            rows[worker] = bench_pipeline.measure(args, worker)
        except SystemExit as e:     # measure() reports a failed worker so
            rows[worker] = {"error": str(e)[-2000:]}
        rec["rows"] = rows
    rec.update({"image_size": ctx.image_size, "batch_size": ctx.batch_size, "threads": ctx.threads,
                "images_per_row": args.images})


def parse_dmon(text: str) -> dict[str, list[float]]:
    """`nvidia-smi dmon -s u` output -> samples per column ("sm", "mem", "enc", "dec", "jpg", ...)."""
    columns: list[str] = []
    samples: dict[str, list[float]] = {}
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if fields[0] == "#":
            if len(fields) > 1 and fields[1].lower() == "gpu":
                columns = [f.lower() for f in fields[1:]]
            continue
        if not columns or len(fields) != len(columns):
            continue
        for col, value in zip(columns[1:], fields[1:]):
            try:
                samples.setdefault(col, []).append(float(value))
            except ValueError:      # "-": not reported by this GPU or driver
                pass
    return samples


class EngineMonitor:
    """`nvidia-smi dmon` running while a measurement runs; None where nvidia-smi is missing."""

    def __init__(self, device_id: int):
        self.device_id, self.proc = device_id, None

    def __enter__(self):
        try:
            self.proc = subprocess.Popen(["nvidia-smi", "dmon", "-s", "u", "-d", "1", "-i", str(self.device_id)],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        except OSError:
            self.proc = None
        return self

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.text, _ = self.proc.communicate(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.text, _ = self.proc.communicate()

    def summary(self) -> dict | None:
        if self.proc is None:
            return None
        samples = parse_dmon(self.text)
        return {col: {"mean": sum(v) / len(v), "max": max(v)} for col, v in samples.items() if v}


def part_hw_decoder(name: str, ctx, rec: Recorder) -> None:
    from pipeline.dali_pipeline import build_pipeline, dali_inputs
    loader = graph_loader(ctx, "cpu")
    recipe = recipe_for(ctx)
    inputs = [dali_inputs(loader.make_batch(0, s), recipe) for s in range(min(8, len(loader)))]
    count = [0]

    def source():
        count[0] += 1
        return inputs[count[0] % len(inputs)]

    loads: dict[str, dict] = {}
    for load in (0.0, 0.75, 1.0):
        pipe = build_pipeline(recipe, source, ctx.batch_size, num_threads=ctx.threads, device="gpu",
                              device_id=ctx.device_id, prefetch=2, hw_decoder_load=load)
        for _ in range(3):
            pipe.run()
        with EngineMonitor(ctx.device_id) as monitor:
            runs, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < 3.0:      # long enough for dmon's 1-second samples
                pipe.run()             # host-synchronous outputs: the time includes the whole batch
                runs += 1
            seconds = time.perf_counter() - t0
        loads[str(load)] = {"images_per_s": runs * ctx.batch_size / seconds, "engines": monitor.summary()}
        rec["loads"] = loads
        del pipe
    jpg = [v["engines"]["jpg"]["max"] for v in loads.values() if v["engines"] and "jpg" in v["engines"]]
    rec["jpeg_engine_reported"] = bool(jpg)
    if jpg:
        rec["hardware_decoder_used"] = loads["1.0"]["engines"]["jpg"]["max"] > 0
    best = max(loads.values(), key=lambda v: v["images_per_s"])
    rec["best_images_per_s"] = best["images_per_s"]


def part_max_batch(name: str, ctx, rec: Recorder) -> None:
    import dataclasses
    import gc

    import torch
    from bench_train import make_trainer, synthetic_batch, timed_steps
    device = torch_device(ctx)
    cfg = load_run_config("slip_vit_b16", [f"data.batch_size={RECIPE_BATCH}", "train.precision=bf16"])
    torch.manual_seed(0)
    trainer = make_trainer(cfg, device, baseline=False, state=None)
    deadline = time.monotonic() + 0.8 * ctx.seconds
    tried: dict[str, dict] = {}

    def fits(b: int) -> bool:
        batch = None
        try:
            torch.cuda.reset_peak_memory_stats(device)
            batch = synthetic_batch(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, batch_size=b)),
                                    device)
            times = timed_steps(trainer, batch, 2)
            tried[str(b)] = {"fits": True, "images_per_s": b / times[-1], **gpu_memory(device)}
            return True
        except torch.cuda.OutOfMemoryError:
            tried[str(b)] = {"fits": False}
            return False
        finally:
            del batch
            trainer.c.optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
            rec["tried"] = tried

    largest, failed, b = None, None, RECIPE_BATCH
    while b <= 4096 and time.monotonic() < deadline:
        if not fits(b):
            failed = b
            break
        largest, b = b, 2 * b
    for _ in range(2):       # bisect between the last fit and the first failure, in steps of 32
        if largest is None or failed is None or failed - largest <= 32 or time.monotonic() > deadline:
            break
        mid = (largest + failed) // 64 * 32
        if fits(mid):
            largest = mid
        else:
            failed = mid
    rec.update({"largest_batch": largest, "first_failure": failed,
                "bounded": "doubling from 64 up to 4096, then two bisection steps, within the time box"})


def part_gpu_tests(name: str, ctx, rec: Recorder) -> None:
    import re
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           "tests/test_loader.py", "tests/test_gpu_path.py", "tests/test_models.py"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(10, ctx.seconds - 5))
    summary = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else ""
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error|errors|deselected)", summary)}
    rec.update({"command": " ".join(cmd[1:]), "returncode": proc.returncode, "summary": summary, "counts": counts,
                "output_tail": (proc.stdout + proc.stderr)[-3000:]})
    if proc.returncode != 0:
        raise RuntimeError(f"GPU tests failed: {summary}")


def part_dead_peer(name: str, ctx, rec: Recorder) -> None:
    sys.path.insert(0, str(ROOT / "tools"))
    import dead_peer_check
    for stop in ("kill", "freeze"):
        result = dead_peer_check.check("nccl", stop, timeout_s=10.0, start_limit_s=max(10, ctx.seconds / 2 - 15))
        rec[stop] = result
        if not result["ok"]:
            raise RuntimeError(f"NCCL, peer {stop}: {result['outcome']}")


PART_FUNCTIONS: dict[str, Callable] = {
    "agreement": part_agreement, "dali_graph": part_dali_graph, "end_to_end": part_end_to_end,
    "pipeline_bench": part_pipeline_bench, "hw_decoder": part_hw_decoder, "max_batch": part_max_batch,
    "gpu_tests": part_gpu_tests, "dead_peer": part_dead_peer,
}


# ---------------------------------------------------------------- environment (in the parent process)

def run_quiet(cmd: list[str], timeout: float = 20) -> str | None:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return proc.stdout.strip() if proc.returncode == 0 else None
    except (OSError, subprocess.TimeoutExpired):
        return None


def package_version(name: str, prefix: bool = False) -> str | None:
    """The installed version of distribution `name` (with `prefix`: of the first whose name starts
    with it, named: DALI's wheels are named per CUDA major)."""
    for dist in importlib.metadata.distributions():
        found = (dist.metadata["Name"] or "").lower()
        if found == name or (prefix and found.startswith(name)):
            return f"{dist.metadata['Name']} {dist.version}" if prefix else dist.version
    return None


def environment(deps: dict[str, bool]) -> dict:
    import torch

    from trainer.flops import peak_for_name
    env = {"python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
           "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "packages": {"dali": package_version("nvidia-dali", prefix=True),
                        **{name: package_version(name) for name in ("webdataset", "ftfy", "pillow-simd", "pillow",
                                                                    "numpy")}},
           "dependencies": deps}
    if torch.cuda.is_available():
        env["devices"] = []
        for i in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(i)
            peak = peak_for_name(props.name)
            env["devices"].append({"index": i, "name": props.name, "capability": f"{props.major}.{props.minor}",
                                   "memory_gib": props.total_memory / 2 ** 30,
                                   "peak_bf16_tflops": peak / 1e12 if peak else None})
    env["nvidia_smi"] = run_quiet(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
                                   "--format=csv,noheader"])
    if deps.get("dali"):
        try:
            from nvidia.dali import backend
            env["nvimgcodec"] = backend.GetNvimgcodecVersion()
        except Exception as e:      # noqa: BLE001  reported, not needed
            env["nvimgcodec"] = f"unavailable: {e}"
    return env


# ---------------------------------------------------------------- the report

def targets(parts: dict) -> list[dict]:
    """The GPU targets against what was measured (None: not measured)."""
    def result(part: str, *keys):
        rec = parts.get(part, {})
        value = rec.get("results", {}) if rec.get("status") in ("ok", "timeout") else {}
        for k in keys:
            value = value.get(k) if isinstance(value, dict) else None
        return value

    mfus = [m for m in (result("train", "mfu"), result("train_compiled", "mfu")) if m is not None]
    gpu_fed = parts.get("end_to_end", {}).get("results", {}).get("data_device") == "gpu"
    rows = [("3-view augmentation at 224 px, DALI GPU loader", f">= {TARGET_IMAGES_PER_S} images/s",
             result("pipeline_bench", "rows", "dali-gpu", "images_per_s"), "{:.0f} images/s",
             lambda v: v >= TARGET_IMAGES_PER_S, "pipeline_bench"),
            ("SLIP ViT-B/16 MFU, bf16, batch 64 per GPU (best of eager and compiled)", f">= {TARGET_MFU:.0%}",
             max(mfus) if mfus else None, "{:.1%}", lambda v: v >= TARGET_MFU, "train, train_compiled"),
            ("data-wait, DALI GPU loader feeding ViT-B/16 SLIP", f"< {TARGET_DATA_WAIT:.0%}",
             result("end_to_end", "data_wait") if gpu_fed else None, "{:.1%}", lambda v: v < TARGET_DATA_WAIT,
             "end_to_end")]
    return [{"target": name, "goal": goal, "measured": value,
             "shown": "not measured" if value is None else shown.format(value),
             "met": met(value) if value is not None else None, "part": part}
            for name, goal, value, shown, met, part in rows]


def summary_line(name: str, rec: dict) -> str:
    """One line of what a part found, for the console and report.md."""
    line = _summary(name, rec.get("results", {}))
    return f"(CPU smoke run) {line}" if line and rec.get("results", {}).get("smoke") else line


def _summary(name: str, r: dict) -> str:
    fmt = lambda v, spec=".1f": "-" if v is None else format(v, spec)   # noqa: E731
    if name in TRAIN_CONFIGS and "images_per_s" in r:
        mfu = f", MFU {100 * r['mfu']:.1f}%" if r.get("mfu") is not None else ""
        mem = f", peak {r['torch_peak_allocated_gib']:.1f} GiB" if "torch_peak_allocated_gib" in r else ""
        how = f"{r.get('config')}{' compiled' if r.get('compile') else ''} batch {r.get('batch_size')}"
        return f"{how}: {fmt(r['images_per_s'])} images/s{mfu}{mem}"
    if name == "agreement" and "compared" in r:
        return (f"{r['compared']}/{r['batches']} batches compared ({r['late_replaced']} with late replacements): "
                f"mean |diff| {fmt(r['mean'], '.4f')}, max {fmt(r['max'], '.3f')} (tolerance {r['tolerance']}); "
                f"within tolerance: {r['within_tolerance']}")
    if name == "dali_graph" and "deterministic" in r:
        return (f"{r['device']}: held batches unchanged {r['held_batches_unchanged']}, distinct buffers "
                f"{r['distinct_buffers']}, deterministic {r['deterministic']}")
    if name == "end_to_end" and "images_per_s" in r:
        mem = r.get("memory", {})
        extra = (f", torch peak {mem['torch_peak_reserved_gib']:.1f} GiB, not torch {mem['not_torch_gib']:.1f} GiB"
                 if mem else "")
        return f"{r['images_per_s']:.1f} images/s, data-wait {100 * r['data_wait']:.1f}%{extra}"
    if name == "pipeline_bench" and "rows" in r:
        return ", ".join(f"{k} {fmt(v.get('images_per_s'))}" if "images_per_s" in v else f"{k}: "
                         + ("skipped" if "skipped" in v else "failed") for k, v in r["rows"].items()) + " images/s"
    if name == "hw_decoder" and "loads" in r:
        return ", ".join(f"load {k}: {v['images_per_s']:.0f} images/s" for k, v in r["loads"].items()) + \
            f"; JPEG engine reported: {r.get('jpeg_engine_reported')}, used: {r.get('hardware_decoder_used', '-')}"
    if name == "max_batch" and "largest_batch" in r:
        return f"largest batch {r['largest_batch']}, first failure {r['first_failure']}"
    if name == "gpu_tests" and "summary" in r:
        return r["summary"]
    if name == "dead_peer" and r:
        return "; ".join(f"peer {k}: ended after {fmt(v.get('seconds'))} s ({v.get('outcome', '')[:80]})"
                         for k, v in r.items())
    return ""


def render_markdown(report: dict) -> str:
    env = report["environment"]
    devices = env.get("devices") or []
    gpu = ", ".join(f"{d['name']} ({d['memory_gib']:.0f} GiB, peak bf16 {d['peak_bf16_tflops'] or '?'} TFLOP/s)"
                    for d in devices) or "none"
    lines = [f"# GPU report ({report['mode']} run{', full' if report['full'] else ''})", "",
             f"Created {report['created']} by `{report['command']}` in {report['seconds']:.0f} s "
             f"(budget {report['budget_s']} s).", "",
             f"- GPU: {gpu}; driver (nvidia-smi): {env.get('nvidia_smi') or 'not available'}",
             f"- Python {env['python']}, torch {env['torch']} (CUDA {env['torch_cuda']}), "
             + ", ".join(f"{k} {v or 'missing'}" for k, v in env["packages"].items()), "",
             "## Targets", "", "| target | goal | measured | met |", "| --- | --- | --- | --- |"]
    for t in report["targets"]:
        met = "-" if t["met"] is None else ("yes" if t["met"] else "**no**")
        lines.append(f"| {t['target']} | {t['goal']} | {t['shown']} | {met} |")
    lines += ["", "## Parts", "", "| part | status | seconds | result |", "| --- | --- | --- | --- |"]
    for name, rec in report["parts"].items():
        status = rec["status"] if rec["status"] != "skipped" else f"skipped: {rec['reason']}"
        lines.append(f"| {name}: {rec['title']} | {status} | {rec['seconds']} | {summary_line(name, rec)} |")
    if report["skipped"]:
        lines += ["", "## Skipped", ""] + [f"- {s['part']}: {s['reason']}" for s in report["skipped"]]
    failures = [(n, r) for n, r in report["parts"].items() if r["status"] in ("failed", "timeout")]
    if failures:
        lines += ["", "## Failures", ""]
        for name, rec in failures:
            lines += [f"### {name} ({rec['status']})", "", "```", (rec.get("error") or "").strip()[-2000:], "```", ""]
    lines += ["", "Every number: report.json, `parts` (one record per part)."]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- main

def shards(folder: Path, gpu: bool) -> Path:
    """The synthetic JPEG shards the data parts read (kept in `--out` for reruns)."""
    manifest = folder / "manifest.json"
    if manifest.exists():
        return manifest
    from bench_pipeline import synthetic_shards
    count, size = (512, (500, 375)) if gpu else (32, (96, 72))
    print(f"writing {count} synthetic {size[0]}x{size[1]} JPEGs ...", flush=True)
    return synthetic_shards(folder, count, size)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, help="folder for report.md, report.json and the parts' logs")
    p.add_argument("--full", action="store_true", help="add ViT-S/16, ViT-L/16, CLIP and xCLIP training")
    p.add_argument("--parts", help="comma-separated parts to run (default: all that apply)")
    p.add_argument("--budget", type=float, help="seconds for the whole run (default: 240, --full 900, CPU 110)")
    p.add_argument("--cpu-only", action="store_true", help="the CPU subset even where CUDA exists")
    p.add_argument("--threads", type=int, default=min(16, os.cpu_count() or 2), help="DALI threads, bench workers")
    p.add_argument("--part", help=argparse.SUPPRESS)
    p.add_argument("--ctx", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.part:
        return child(a.part, json.loads(a.ctx))
    if a.out is None:
        p.error("--out is required")
    t0 = time.perf_counter()
    import torch
    gpu = torch.cuda.is_available() and not a.cpu_only
    budget = a.budget or ((FULL_BUDGET_S if a.full else GPU_BUDGET_S) if gpu else CPU_BUDGET_S)
    deps = {name: available(module) for name, module in DEPENDENCIES.items()}
    parts = select_parts(a.parts.split(",") if a.parts else None, a.full)
    (a.out / "parts").mkdir(parents=True, exist_ok=True)
    previous = a.out / "report.json"
    report = {"created": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join(["python", "tools/gpu_report.py"] + (argv if argv is not None else sys.argv[1:])),
              "mode": "gpu" if gpu else "cpu", "full": a.full, "budget_s": budget,
              "environment": environment(deps), "parts": {}}
    if a.parts and previous.exists():       # a rerun of some parts updates the report it joins
        old = json.loads(previous.read_text())
        if old.get("mode") == report["mode"]:
            report["parts"] = old["parts"]
    ctx = {"out": str(a.out.resolve()), "gpu": gpu, "deps": deps, "threads": a.threads,
           "device_id": torch.cuda.current_device() if gpu else None,
           "image_size": 224 if gpu else 32, "batch_size": RECIPE_BATCH if gpu else 8, "manifest": None}
    if deps["dali"] and any(part.shards for part in parts):
        ctx["manifest"] = str(shards(a.out / f"shards_{report['mode']}", gpu))
    for part in parts:
        remaining = budget - (time.perf_counter() - t0)
        reason = skip_reason(part, gpu, deps, remaining, torch.cuda.device_count() if gpu else 0)
        if reason:
            report["parts"][part.name] = {"title": part.title, "status": "skipped", "reason": reason,
                                          "seconds": 0, "results": {}, "error": None}
            print(f"{part.name:16s} skipped: {reason}", flush=True)
            continue
        rec = run_part(part, ctx, min(part.seconds, remaining), a.out)
        report["parts"][part.name] = rec
        print(f"{part.name:16s} {rec['status']:8s} {rec['seconds']:6.1f} s  {summary_line(part.name, rec)}",
              flush=True)
    report["skipped"] = [{"part": n, "reason": r["reason"]} for n, r in report["parts"].items()
                         if r["status"] == "skipped"]
    report["targets"] = targets(report["parts"])
    report["seconds"] = time.perf_counter() - t0
    write_json_atomic(a.out / "report.json", report, indent=1, default=str)
    (a.out / "report.md").write_text(render_markdown(report))
    failed = [n for n, r in report["parts"].items() if r["status"] in ("failed", "timeout")]
    print(f"\n{a.out / 'report.md'}: {len(report['parts']) - len(report['skipped']) - len(failed)} parts ok, "
          f"{len(failed)} failed {failed or ''}, {len(report['skipped'])} skipped, {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
