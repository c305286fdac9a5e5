"""From a run configuration to what the loop needs: process group and device, precision, model,
objective, loader, optimizer and schedule, DDP / compile wrappers, MFU inputs, the evaluation hook;
for a finetuning run the model, data, weight-decay groups and evaluation of trainer/finetune.py.
(Which checkpoint a run resumes from: trainer/resume.py.)"""
from __future__ import annotations

import random

import numpy as np
import torch

from trainer.batches import build_loader
from trainer.config import ConfigError, RunConfig
from trainer.convert import ConversionError, init_from
from trainer.distributed import DistInfo, init_distributed
from trainer.evaluation import make_train_hook
from trainer.finetune import build_finetune_parts, is_finetuning
from trainer.flops import flops_per_sample, peak_flops
from trainer.loop import Components
from trainer.models import build_model
from trainer.objectives import build_objective
from trainer.optim import WarmupCosine, build_optimizer
from trainer.resume import manifests_sha256

_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of `train.precision` ("auto": bf16 on GPU, fp32 elsewhere); None = fp32."""
    if precision == "auto":
        precision = "bf16" if device.type == "cuda" else "fp32"
    return _AMP_DTYPES[precision]


def grad_scaler(amp_dtype: torch.dtype | None, device: torch.device) -> torch.amp.GradScaler | None:
    """fp16 needs loss scaling; bf16 and fp32 do not."""
    return torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_components(cfg: RunConfig, info: DistInfo | None = None) -> Components:
    """Everything for `Trainer(...)`. `info` is the process group the caller joined (trainer/run.py);
    without it the group is joined here (torchrun / SLURM environment), which selects the CUDA device."""
    from pipeline.manifest import load_manifest

    info = info or init_distributed(cfg.dist)
    rank, world, device = info.rank, info.world_size, info.device
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    amp_dtype = autocast_dtype(cfg.train.precision, device)
    scaler = grad_scaler(amp_dtype, device)

    seed_everything(cfg.train.seed)      # identical model init on every rank
    finetune = build_finetune_parts(cfg, device, rank) if is_finetuning(cfg) else None
    if finetune is not None:
        model, data, group_options = finetune.model, finetune.train, finetune.group_options
    else:
        # The global batch per view picks the SimCLR-head norm (SyncBN at reference scale, see models.py).
        model = build_model(cfg.model, cfg.objective.name, global_batch_size=cfg.data.batch_size * world)
        if cfg.model.init_from:   # weights only (no random draws); a resumed checkpoint loaded later overrides them
            try:
                lines = init_from(model, cfg.model.init_from, cfg)
            except ConversionError as e:
                raise ConfigError(f"model.init_from: {e}") from None
            if rank == 0:
                print("\n".join(lines), flush=True)
        data = []
        for path in cfg.data.manifests:
            try:
                data.append(load_manifest(path))
            except ValueError as e:
                raise ConfigError(f"data.manifest: {e}") from None
        if not data:
            raise ConfigError("data.manifest: no manifest given (a shard build's manifest json, or a list of them)")
        group_options = {}
    model.to(device)
    objective = build_objective(cfg.objective)
    seed_everything(cfg.train.seed * 1000 + rank)   # per-rank streams from here on

    loader = build_loader(cfg, data, device, rank, world)
    accum = cfg.optim.accum_steps
    steps_per_epoch = loader.steps_per_epoch // accum
    if steps_per_epoch < 1:
        raise ConfigError(f"{cfg.data.train or cfg.data.manifest}: {loader.num_samples} samples make no optimizer "
                          f"step at batch {cfg.data.batch_size} x {world} ranks x {accum} accumulation")
    total_steps = max(1, int(cfg.optim.epochs * steps_per_epoch))
    optimizer = build_optimizer(model, cfg.optim, **group_options)
    o = cfg.optim
    # rates given per a reference global batch scale with the run's (BEiT: lr = base * batch / 256)
    scale = cfg.data.batch_size * accum * world / o.lr_reference_batch if o.lr_reference_batch else 1.0
    scheduler = WarmupCosine(optimizer, o.lr * scale, int(o.warmup_epochs * steps_per_epoch),
                             total_steps, o.warmup_start_lr * scale, o.min_lr * scale)

    train_model = model
    if world > 1:
        ddp_kwargs = {"device_ids": [device.index]} if device.type == "cuda" else {}
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=cfg.train.find_unused_parameters,
            static_graph=cfg.train.static_graph, **ddp_kwargs)
    if cfg.train.compile:
        train_model = torch.compile(train_model)

    peak = peak_flops(device, cfg.train.peak_tflops)
    # FLOPs of one training sample (all views + text), only needed for MFU
    train_flops = flops_per_sample(cfg.model, cfg.objective.name) if peak else None
    return Components(cfg=cfg, model=model, train_model=train_model, objective=objective, optimizer=optimizer,
                      scheduler=scheduler, loader=loader, device=device, rank=rank, world_size=world,
                      amp_dtype=amp_dtype, scaler=scaler,
                      total_steps=min(total_steps, cfg.optim.max_steps or total_steps),
                      flops_per_sample=train_flops, peak_flops=peak,
                      evaluate=finetune.evaluate if finetune else make_train_hook(cfg),
                      manifest_sha256=None if finetune else manifests_sha256(cfg.data.manifests),
                      on_device=finetune.on_device if finetune else None,
                      eval_every_steps=(finetune.eval_every_epochs * steps_per_epoch) if finetune else None)

