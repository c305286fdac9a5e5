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
import sys

from trainer import checkpoint as ckpt
from trainer.components import build_components, resolve_resume
from trainer.config import ConfigError, load_config, save_config
from trainer.distributed import cleanup
from trainer.loop import NonFiniteLossError, Trainer


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run configuration (trainer/configs/*.yaml)")
    p.add_argument("--resume", help="auto | latest | none | PATH (overrides checkpoint.resume)")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=1e-3")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.resume:
            cfg.checkpoint.resume = args.resume
        trainer = Trainer(build_components(cfg))
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
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
