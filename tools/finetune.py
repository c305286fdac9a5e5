#!/usr/bin/env python
"""Finetune a pretrained image tower end to end on a labelled set (the SLIP paper's third evaluation).

    python tools/finetune.py --checkpoint runs/slip_b16/checkpoints/step_00089650.pt \
        --config trainer/configs/finetune_vit_b16.yaml data.train=/data/imagenet/train data.val=/data/imagenet/val
    python tools/finetune.py --config trainer/configs/finetune_demo.yaml          # random init: the baseline
    torchrun --nproc_per_node 8 tools/finetune.py --checkpoint ... --config ...   # DDP / SLURM as in pretraining

The checkpoint is any one we read (ours of any objective, a converted one, a SLIP-reference file,
an OpenCLIP or timm folder); only its image tower is loaded. Everything else is the pretraining
trainer (trainer/run.py): the same overrides, resume rules, exit codes, metrics and checkpoints.
"""
from __future__ import annotations

import argparse
import sys

from pipeline.cli import report, run_main
from trainer import run
from trainer.config import ConfigError, load_config
from trainer.finetune import CLASSIFICATION


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Other options (--resume, --overwrite, --allow-config-change) and key=value "
                                       "overrides are trainer/run.py's.")
    p.add_argument("--checkpoint", help="pretrained checkpoint whose image tower is finetuned (default: random init)")
    p.add_argument("--config", required=True, help="finetuning config (trainer/configs/finetune_*.yaml)")
    args, rest = p.parse_known_args(argv)
    overrides = [f"finetune.checkpoint={args.checkpoint}"] if args.checkpoint else []
    try:
        name = load_config(args.config, [a for a in rest if "=" in a and not a.startswith("-")]).objective.name
    except ConfigError as e:
        return report(e, 2, "config error")
    if name != CLASSIFICATION:
        wrong = ConfigError(f"{args.config} is a {name} pretraining config; finetuning needs "
                            f"objective.name={CLASSIFICATION} (trainer/configs/finetune_*.yaml)")
        return report(wrong, 2, "config error")
    return run.main(["--config", args.config, *rest, *overrides])


if __name__ == "__main__":
    sys.exit(run_main(main))
