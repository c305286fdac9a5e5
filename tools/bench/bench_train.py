#!/usr/bin/env python
"""Training throughput: steps/s, images/s, data-wait share, MFU (GPU), and a reference baseline.

    python tools/bench/bench_train.py --config trainer/configs/demo_slip.yaml [key=value ...] [--steps 10]

Two measurements in the same process:
1. Compute: the trainer's own train step (optimizer included) on fixed in-memory batches, against a
   baseline built like the SLIP reference on the same model size and weights: three separate
   encoder passes (CLIP view, SSL view 1, SSL view 2), eager attention (explicit softmax(QK^T)V with
   an additive causal mask), fp32. Rounds of the two alternate so that load on a shared machine
   hits both alike; the median step time is reported, and the ratio ours/baseline.
   Its synthetic captions run up to the context length, so `data.text_padding=longest` saves
   nothing there; its savings show end to end.
2. End to end (when data.manifest exists): the real DALI loader feeding the same train step;
   images/s and the share of step time blocked on the loader (data-wait).

A finetuning config (objective `classification`) measures the finetuning step the same way: the
classifier on one view against soft targets, ours (fused attention, autocast) against the eager
fp32 baseline; end to end, the labelled loader (`data.train`) with RandAugment and the on-device
erasing and mixing.

`compute_throughput` and `end_to_end` return their numbers for other tools (tools/gpu_report.py).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
from dataclasses import replace
from pathlib import Path

import torch

from trainer.batches import build_loader, endless, to_device
from trainer.classifier import ImageClassifier
from trainer.components import autocast_dtype, grad_scaler
from trainer.config import RunConfig, load_config
from trainer.distributed import cuda_device_index
from trainer.finetune import ClassifierForward, MixOnDevice, group_options, is_finetuning
from trainer.flops import flops_per_sample, peak_flops
from trainer.loop import Components, Trainer
from trainer.metrics import model_flops_utilisation
from trainer.models import Attention, build_model
from trainer.objectives import build_objective, objective_parts
from trainer.optim import WarmupCosine, build_optimizer


def eager_attention(self: Attention, x: torch.Tensor) -> torch.Tensor:
    """The reference's attention: explicit scores, softmax, weighted sum (no fused kernel)."""
    b, n, c = x.shape
    h = self.heads
    q, k, v = self.qkv(x).view(b, n, 3, h, c // h).permute(2, 0, 3, 1, 4)
    scores = (q * (c // h) ** -0.5) @ k.transpose(-2, -1)
    if self.causal:
        scores = scores + torch.full((n, n), float("-inf"), device=x.device).triu(1)
    x = scores.softmax(dim=-1) @ v
    return self.proj(x.transpose(1, 2).reshape(b, n, c))


def synthetic_batch(cfg: RunConfig, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)
    b, s = cfg.data.batch_size, cfg.model.image_size
    batch = {"clip_image": torch.randn(b, 3, s, s, generator=g)}
    if is_finetuning(cfg):
        batch["target"] = torch.randn(b, num_classes(cfg), generator=g).softmax(-1)
        return {k: v.to(device) for k, v in batch.items()}
    if cfg.data.recipe.num_ssl_views == 2:
        batch["ssl_image_1"] = torch.randn(b, 3, s, s, generator=g)
        batch["ssl_image_2"] = torch.randn(b, 3, s, s, generator=g)
    text = torch.randint(1, 49000, (b, cfg.model.context_length), generator=g)
    lengths = torch.randint(5, cfg.model.context_length, (b,), generator=g)
    text[torch.arange(b), lengths] = 49407            # EOT: the argmax the text tower pools at
    text[torch.arange(cfg.model.context_length)[None] > lengths[:, None]] = 0
    batch["text"] = text
    return {k: v.to(device) for k, v in batch.items()}


def num_classes(cfg: RunConfig) -> int:
    """The training set's classes when it is there, else ImageNet's 1000."""
    if cfg.data.train and Path(cfg.data.train).exists():
        from pipeline.labelled import open_labelled
        return open_labelled(cfg.data.train).num_classes
    return 1000


def make_trainer(cfg: RunConfig, device: torch.device, baseline: bool, state: dict | None) -> Trainer:
    model_cfg = replace(cfg.model, single_pass_views=False, grad_checkpointing=False) if baseline else cfg.model
    if is_finetuning(cfg):
        model = ClassifierForward(ImageClassifier(model_cfg, num_classes(cfg))).to(device)
    else:
        model = build_model(model_cfg, cfg.objective.name, global_batch_size=cfg.data.batch_size).to(device)
    if state is not None:
        model.load_state_dict(state)
    if baseline:
        for m in model.modules():
            if isinstance(m, Attention):
                m.forward = types.MethodType(eager_attention, m)
    amp = None if baseline else autocast_dtype(cfg.train.precision, device)
    train_model = torch.compile(model) if cfg.train.compile and not baseline else model
    opt = build_optimizer(model, cfg.optim, **(group_options(cfg) if is_finetuning(cfg) else {}))
    c = Components(cfg=cfg, model=model, train_model=train_model, objective=build_objective(cfg.objective),
                   optimizer=opt, scheduler=WarmupCosine(opt, cfg.optim.lr, 0, 10**6), loader=None,
                   device=device, amp_dtype=amp, scaler=grad_scaler(amp, device))
    return Trainer(c)


def timed_steps(trainer: Trainer, batch: dict, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        trainer.train_step([batch])
        if batch["clip_image"].is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return times


def end_to_end(cfg: RunConfig, trainer: Trainer, device: torch.device, steps: int, warmup: int) -> dict:
    if is_finetuning(cfg):
        from pipeline.labelled import open_labelled
        data = open_labelled(cfg.data.train)
        on_device = MixOnDevice(data.num_classes, cfg.data.recipe.mix.label_smoothing)
    else:
        from pipeline.manifest import load_manifest
        data, on_device = load_manifest(cfg.data.manifest), (lambda batch: batch)
    loader = build_loader(cfg, data, device)
    stream = endless(loader)
    for _ in range(warmup):
        trainer.train_step([on_device(to_device(next(stream), device, cfg.data.text_padding))])
    wait = 0.0
    if device.type == "cuda":
        torch.cuda.synchronize()
    t_start = time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = on_device(to_device(next(stream), device, cfg.data.text_padding))
        wait += time.perf_counter() - t0
        trainer.train_step([batch])
    if device.type == "cuda":
        torch.cuda.synchronize()
    total = time.perf_counter() - t_start
    return {"steps_per_s": steps / total, "images_per_s": steps * cfg.data.batch_size / total,
            "data_wait": wait / total, "bad_samples": getattr(loader, "bad_samples", 0)}


def compute_throughput(cfg: RunConfig, device: torch.device, steps: int, rounds: int, warmup: int,
                       baseline: bool = True) -> tuple[dict, Trainer]:
    """Measurement 1: median step time of ours (and of the reference-structured baseline, alternating
    rounds); images/s, and MFU where the device's peak is known. Also returns our trainer."""
    torch.manual_seed(cfg.train.seed)
    ours = make_trainer(cfg, device, baseline=False, state=None)
    base = make_trainer(cfg, device, baseline=True, state=ours.c.model.state_dict()) if baseline else None
    batch = synthetic_batch(cfg, device)
    timed_steps(ours, batch, warmup)
    if base:
        timed_steps(base, batch, warmup)
    t_ours, t_base = [], []
    for _ in range(rounds):
        t_ours += timed_steps(ours, batch, steps)
        if base:
            t_base += timed_steps(base, batch, steps)
    med, b = statistics.median(t_ours), cfg.data.batch_size
    out = {"batch_size": b, "step_s": med, "steps_per_s": 1 / med, "images_per_s": b / med, "steps": len(t_ours),
           "peak_flops": peak_flops(device, cfg.train.peak_tflops), "mfu": None}
    if out["peak_flops"]:
        out["train_flops_per_sample"] = fps = flops_per_sample(cfg.model, cfg.objective.name).train
        out["mfu"] = model_flops_utilisation(b / med, fps, out["peak_flops"], 1)
    if base:
        med_b = statistics.median(t_base)
        out.update(baseline_step_s=med_b, baseline_images_per_s=b / med_b, speedup=med_b / med)
    return out, ours


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("overrides", nargs="*")
    p.add_argument("--steps", type=int, default=10, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3, help="alternating ours/baseline rounds")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-baseline", action="store_true")
    p.add_argument("--no-data", action="store_true", help="skip the end-to-end loader measurement")
    a = p.parse_args(argv)
    cfg = load_config(a.config, a.overrides)
    # an explicit index: the loader's DALI graph runs on this very device
    device = torch.device("cuda", cuda_device_index(torch.device("cuda"))) if torch.cuda.is_available() \
        else torch.device("cpu")
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    views = objective_parts(cfg.objective.name).image_views
    print(f"{cfg.model.name} {cfg.objective.name}: batch {cfg.data.batch_size} on {device}, "
          f"{views} image view(s) at {cfg.model.image_size}px, precision {cfg.train.precision}, "
          f"compile {cfg.train.compile}, torch threads {torch.get_num_threads()}", flush=True)
    r, ours = compute_throughput(cfg, device, a.steps, a.rounds, a.warmup, baseline=not a.no_baseline)
    print(f"compute   ours:     {r['steps_per_s']:7.3f} steps/s  {r['images_per_s']:8.1f} images/s  "
          f"(median of {r['steps']} steps)")
    if r["mfu"] is not None:
        print(f"          MFU {100 * r['mfu']:.1f}% (peak {r['peak_flops'] / 1e12:.0f} TFLOP/s)")
    if "speedup" in r:
        structure = "eager attention, fp32" if is_finetuning(cfg) else \
            "3 separate encoder passes, eager attention, fp32"
        print(f"compute   baseline: {1 / r['baseline_step_s']:7.3f} steps/s  {r['baseline_images_per_s']:8.1f} images/s  "
              f"({structure})")
        print(f"speed-up ours/baseline: {r['speedup']:.2f}x")
    if not a.no_data:
        source = cfg.data.train if is_finetuning(cfg) else cfg.data.manifest
        if source and Path(source).exists():
            e2e = end_to_end(cfg, ours, device, a.steps * a.rounds, a.warmup)
            print(f"end-to-end ours:    {e2e['steps_per_s']:7.3f} steps/s  {e2e['images_per_s']:8.1f} images/s  "
                  f"data-wait {100 * e2e['data_wait']:.1f}%  ({cfg.data.backend} {cfg.data.num_threads} threads, "
                  f"{e2e['bad_samples']} bad samples)")
        else:
            print(f"end-to-end skipped: {source!r} not found")
    return 0


if __name__ == "__main__":
    sys.exit(main())
