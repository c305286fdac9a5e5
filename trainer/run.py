#!/usr/bin/env python
"""Train SLIP / CLIP / SimCLR / xCLIP: config -> components -> loop.

    python trainer/run.py --config trainer/configs/demo_slip.yaml out_dir=runs/x optim.lr=1e-3
    torchrun --nproc_per_node 8 trainer/run.py --config trainer/configs/slip_vit_b16.yaml
    srun python trainer/run.py --config ...            # rank/world size from the SLURM environment

An output directory that already holds a checkpoint is resumed automatically (`--resume none`
starts over); `--resume latest` insists on one, `--resume PATH` names one.
"""
from __future__ import annotations

import argparse
import os
import random
import sys

import numpy as np
import torch
import torch.distributed as dist

from trainer import checkpoint as ckpt
from trainer.config import ConfigError, RunConfig, load_config, save_config
from trainer.loop import Components, NonFiniteLossError, Trainer
from trainer.optim import WarmupCosine, build_optimizer

# Dense bf16 tensor-core peak per device (FLOP/s), for MFU. Override with train.peak_tflops.
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "GH200": 989e12, "A100": 312e12, "L40S": 362e12,
                   "A10G": 70e12, "A10": 125e12, "L4": 121e12, "RTX 4090": 165e12, "V100": 125e12}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run configuration (trainer/configs/*.yaml)")
    p.add_argument("--resume", help="auto | latest | none | PATH (overrides checkpoint.resume)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=1e-3")
    return p.parse_args(argv)


def peak_flops(cfg: RunConfig, device: torch.device) -> float | None:
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16_FLOPS.items():
        if key in name:
            return value
    return None


def resolve_resume(cfg: RunConfig) -> str | None:
    ckpt_dir = os.path.join(cfg.out_dir, "checkpoints")
    mode = cfg.checkpoint.resume
    if mode == "none":
        return None
    latest = ckpt.latest_checkpoint(ckpt_dir)
    if mode == "auto":
        return str(latest) if latest else None
    if mode == "latest":
        if latest is None:
            raise SystemExit(f"--resume latest: no checkpoint in {ckpt_dir}")
        return str(latest)
    return mode


def setup_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); torchrun and SLURM environments are read by trainer.distributed."""
    from trainer.distributed import init_distributed
    init_distributed()
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    local = int(os.environ.get("LOCAL_RANK", os.environ.get("SLURM_LOCALID", 0)))
    return rank, world, local


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_loader(cfg: RunConfig, manifest, device: torch.device, rank: int = 0, world: int = 1) -> SLIPLoader:
    """This rank's loader; DALI augments on the training device unless told otherwise."""
    from pipeline.loader import SLIPLoader
    from pipeline.tokenizer import Tokenizer
    data_device = cfg.data.device
    if data_device == "auto":
        data_device = "gpu" if device.type == "cuda" and cfg.data.backend == "dali" else "cpu"
    return SLIPLoader(manifest, cfg.data.recipe, cfg.data.batch_size, Tokenizer(), rank=rank, world_size=world,
                      seed=cfg.train.seed, num_threads=cfg.data.num_threads, device=data_device,
                      device_id=device.index if data_device == "gpu" else None,
                      caption_mode=cfg.data.caption_mode, backend=cfg.data.backend)


def build(cfg: RunConfig) -> Trainer:
    from pipeline.manifest import load_manifest
    from trainer.models import build_model
    from trainer.objectives import build_objective

    rank, world, local = setup_distributed()
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    if torch.cuda.is_available():
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:
        device = torch.device("cpu")
    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[precision]
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    seed_everything(cfg.train.seed)      # identical model init on every rank
    # The global batch per view picks the SimCLR-head norm (SyncBN at reference scale, see models.py).
    model = build_model(cfg.model, cfg.objective.name, global_batch_size=cfg.data.batch_size * world)
    model.to(device)
    objective = build_objective(cfg.objective)
    seed_everything(cfg.train.seed * 1000 + rank)   # per-rank streams from here on

    manifest = load_manifest(cfg.data.manifest)
    loader = build_loader(cfg, manifest, device, rank, world)
    accum = cfg.optim.accum_steps
    steps_per_epoch = loader.steps_per_epoch // accum
    if steps_per_epoch < 1:
        raise ConfigError(f"{cfg.data.manifest}: {manifest.total_samples} samples make no optimizer step at "
                          f"batch {cfg.data.batch_size} x {world} ranks x {accum} accumulation")
    total_steps = max(1, int(cfg.optim.epochs * steps_per_epoch))
    optimizer = build_optimizer(model, cfg.optim)
    scheduler = WarmupCosine(optimizer, cfg.optim.lr, int(cfg.optim.warmup_epochs * steps_per_epoch),
                             total_steps, cfg.optim.warmup_start_lr, cfg.optim.min_lr)

    train_model = model
    if world > 1:
        ddp_kwargs = {"device_ids": [local]} if device.type == "cuda" else {}
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=cfg.train.find_unused_parameters,
            static_graph=cfg.train.static_graph, **ddp_kwargs)
    if cfg.train.compile:
        train_model = torch.compile(train_model)

    peak = peak_flops(cfg, device)
    c = Components(cfg=cfg, model=model, train_model=train_model, objective=objective, optimizer=optimizer,
                   scheduler=scheduler, loader=loader, device=device, rank=rank, world_size=world,
                   amp_dtype=amp_dtype, scaler=scaler,
                   total_steps=min(total_steps, cfg.optim.max_steps or total_steps),
                   flops_per_sample=_flops_per_sample(cfg) if peak else None, peak_flops=peak,
                   evaluate=_evaluator(cfg, device))
    return Trainer(c)


def _flops_per_sample(cfg: RunConfig) -> float | None:
    """Forward+backward FLOPs of one training sample (all views + text), for MFU."""
    from trainer.flops import flops_per_sample
    return float(flops_per_sample(cfg.model, cfg.objective.name).train)


def _evaluator(cfg: RunConfig, device: torch.device):
    if not cfg.eval.data:
        return None
    from trainer.evaluation import make_train_hook
    return make_train_hook(cfg.eval.data, device=device, batch_size=cfg.eval.batch_size, run_cfg=cfg)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.resume:
            cfg.checkpoint.resume = args.resume
        trainer = build(cfg)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    c = trainer.c
    os.makedirs(cfg.out_dir, exist_ok=True)
    if c.rank == 0:
        save_config(cfg, os.path.join(cfg.out_dir, "config.yaml"))
    resume = resolve_resume(cfg)
    if resume:
        trainer.load_state_dict(ckpt.load_checkpoint(resume), resume)
        if c.rank == 0:
            print(f"resumed from {resume} at step {trainer.state.step}", flush=True)
    if c.rank == 0:
        n_params = sum(p.numel() for p in c.model.parameters())
        print(f"{cfg.objective.name}: {n_params / 1e6:.1f}M parameters, {c.world_size} rank(s) on {c.device}, "
              f"global batch {cfg.data.batch_size * cfg.optim.accum_steps * c.world_size}, "
              f"{c.total_steps} steps, out {cfg.out_dir}", flush=True)
    try:
        trainer.fit()
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
