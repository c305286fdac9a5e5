"""Evaluate a checkpoint (or a randomly initialised model): zero-shot, linear probe, retrieval -> JSON.

    python tools/evaluate.py --checkpoint runs/x/checkpoints/step_00001000.pt --data demo_run/data/eval \
        --out runs/x/eval.json
    python tools/evaluate.py --config trainer/configs/demo_slip.yaml --random-init --data DIR --out r.json

The model configuration is `--config` if given, else the one stored in the checkpoint, else the
run's saved `config.yaml` (next to `checkpoints/`). Images are prepared as the run's recipe says. `--data` is an evaluation directory (train/ + val/ + classnames.json +
templates.json + val_captions.jsonl, as the demo builds), an ImageFolder directory, or labelled
webdataset shards (a directory or a glob). Without `--templates` a dataset's own templates.json is
used, else the SLIP paper's 7 ImageNet templates; ImageNet class names ship in trainer/data/.
"""
from __future__ import annotations

import argparse
import glob
import json
import sys
import time
from pathlib import Path

import torch

from pipeline.regular_files import is_regular
from trainer.checkpoint import CheckpointError, load_model
from trainer.config import ConfigError, RunConfig, load_config
from trainer.evaluation import TASKS, EvalConfig, Evaluator, EvalTransform, LinearProbeConfig, save_results
from trainer.models import build_model
from pipeline.cli import report, run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="trainer checkpoint (.pt)")
    src.add_argument("--random-init", action="store_true", help="evaluate a randomly initialised model (baseline)")
    p.add_argument("--config", help="run config YAML (default: the run's saved config.yaml)")
    p.add_argument("--data", required=True, help="evaluation dir, ImageFolder dir or shard dir/glob")
    p.add_argument("--out", help="results JSON (default: print only)")
    p.add_argument("--tasks", default=",".join(TASKS), help=f"comma-separated subset of {','.join(TASKS)}")
    p.add_argument("--classnames", help="JSON list of class names (default: the data's classnames.json)")
    p.add_argument("--templates", help="JSON list of prompt templates with {} (default: data's templates.json or ImageNet 7)")
    p.add_argument("--batch-size", type=int, default=None, help="default: the run's eval.batch_size")
    p.add_argument("--probe", choices=("lbfgs", "sgd"), default="lbfgs", help="linear-probe solver")
    p.add_argument("--probe-epochs", type=int, default=90, help="sgd solver epochs")
    p.add_argument("--probe-lr", type=float, default=0.1, help="sgd solver lr per 256 samples")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed for --random-init")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return evaluate(args)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        return report(e, 2)


def random_model(run_cfg: RunConfig, seed: int, device: str) -> torch.nn.Module:
    """The run's model, randomly initialised from `seed`: the untrained baseline."""
    torch.manual_seed(seed)
    return build_model(run_cfg.model, run_cfg.objective.name).to(device).eval()


def evaluate(args) -> int:
    if not glob.has_magic(args.data) and not Path(args.data).exists():   # before any model is built
        raise FileNotFoundError(f"--data {args.data}: no such file or directory")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.random_init and not args.config:
        sys.exit("--random-init needs --config (the model to initialise)")
    if args.checkpoint and Path(args.checkpoint).exists() and not is_regular(args.checkpoint):
        # a FIFO or device named like a checkpoint would block or never end
        raise CheckpointError(f"{args.checkpoint}: not a regular file; refused as a checkpoint")
    t0 = time.time()
    if args.random_init:
        run_cfg = load_config(args.config)
        model = random_model(run_cfg, args.seed, args.device)
    else:
        model, run_cfg = load_model(args.checkpoint, args.config, args.device)
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    cfg = EvalConfig(data=args.data, tasks=tasks, batch_size=args.batch_size or run_cfg.eval.batch_size,
                     classnames=args.classnames, templates=args.templates,
                     probe=LinearProbeConfig(solver=args.probe, epochs=args.probe_epochs, lr=args.probe_lr))
    results = Evaluator(cfg, EvalTransform.from_recipe(run_cfg.data.recipe))(model)
    results["checkpoint"] = "random-init" if args.random_init else str(args.checkpoint)
    results["objective"] = run_cfg.objective.name
    results["model"] = run_cfg.model.name
    results["seconds"] = round(time.time() - t0, 2)
    if args.out:
        save_results(results, args.out)
    summary = {k: results[k] for k in ("zeroshot", "linear_probe", "retrieval") if k in results}
    short = {task: {k: round(v, 2) for k, v in m.items() if k in ("top1", "top5", "mean_per_class", "chance_top1")
                    or k.endswith("R@1") or k.endswith("R@5")} for task, m in summary.items()}
    print(json.dumps({"checkpoint": results["checkpoint"], **short, "bad_images": results["bad_images"]["count"],
                      "out": args.out}, indent=1))
    if results["bad_images"]["count"]:
        print(f"warning: {results['bad_images']['count']} unreadable images skipped "
              f"(listed in {args.out or 'the results'})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
