"""Evaluate a checkpoint (or a randomly initialised model): zero-shot, linear probe, retrieval -> JSON.

    python tools/evaluate.py --checkpoint runs/x/checkpoints/step_00001000.pt --data demo_run/data/eval \
        --out runs/x/eval.json
    python tools/evaluate.py --config trainer/configs/demo_slip.yaml --random-init --data DIR --out r.json
    python tools/evaluate.py --checkpoint X.pt --data /data/glue/STS-B/dev.tsv --tasks sts --out sts.json
    python tools/evaluate.py --checkpoint X.pt --data /data/glue/SST-2 --tasks text_probe --out sst2.json
    # a suite (trainer/configs/eval/): many datasets x many checkpoints and the random baseline
    python tools/evaluate.py --suite trainer/configs/eval/imagenet_ood.yaml --root /data/eval \
        --checkpoint runs/clip/checkpoints/last.pt runs/slip/checkpoints/last.pt --random-init --out results/

The model configuration is `--config` if given, else the one stored in the checkpoint, else the
run's saved `config.yaml` (next to `checkpoints/`). Images are prepared as the run's recipe says. `--data` is an evaluation directory (train/ + val/ + classnames.json +
templates.json + val_captions.jsonl, as the demo builds), an ImageFolder directory, or labelled
webdataset shards (a directory or a glob). Without `--templates` a dataset's own templates.json is
used, else the SLIP paper's 7 ImageNet templates; ImageNet class names ship in trainer/data/.
A CLIP-benchmark webdataset folder (`classnames.txt`, `zeroshot_classification_templates.txt`,
`test/nshards.txt` + shards) is read as it is published. The text tasks (`sts`: a GLUE STS-B TSV;
`text_probe`: a GLUE single-sentence folder with train.tsv and dev.tsv) judge the text tower alone
(trainer/evaluation/text.py).

Suite mode (`--suite FILE --root DIR`, trainer/evaluation/suite.py): `--out` is a folder that
receives results.json (one record per model x dataset x task x metric), results.md (a table per
task: a row per model, a column per dataset, the average) and results.png, and keeps every model's
encodings under cache/ keyed by the weights' content, so rerunning a killed run recomputes nothing
already written. Each checkpoint uses its own run configuration; `--random-init` adds the untrained
baseline with `--config`'s architecture, else the first checkpoint's. `--batch-size` and
`--probe`/`--probe-epochs`/`--probe-lr` override the suite file's `batch_size` and `probe`.
"""
from __future__ import annotations

import argparse
import dataclasses
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
from trainer.evaluation.text import TEXT_TASKS, sts, text_probe
from trainer.models import build_model
from pipeline.cli import report, run_main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", nargs="+", help="trainer checkpoint(s) (.pt); several only with --suite")
    p.add_argument("--random-init", action="store_true", help="evaluate a randomly initialised model (baseline)")
    p.add_argument("--config", help="run config YAML (default: the run's saved config.yaml); with --suite, the "
                                    "--random-init model's")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="evaluation dir, ImageFolder dir, shard dir/glob, CLIP-benchmark folder, "
                                     "GLUE TSV or folder")
    what.add_argument("--suite", help="suite YAML (trainer/configs/eval/*.yaml): many datasets, under --root")
    p.add_argument("--root", help="with --suite: the folder the suite's dataset paths are relative to")
    p.add_argument("--out", help="results JSON (default: print only); with --suite a folder (required)")
    p.add_argument("--tasks", default=None,
                   help=f"comma-separated subset of {','.join(TASKS)} (default: all), or of the text tasks "
                        f"{','.join(TEXT_TASKS)}; --data only (a suite lists each dataset's tasks)")
    p.add_argument("--classnames", help="JSON list of class names (default: the data's classnames.json)")
    p.add_argument("--templates", help="JSON list of prompt templates with {} (default: data's templates.json or ImageNet 7)")
    # with --suite these four override the suite file's batch_size / probe
    p.add_argument("--batch-size", type=int, default=None, help="default: the suite's, else the run's eval.batch_size")
    p.add_argument("--probe", choices=("lbfgs", "sgd"), default=None, help="linear-probe solver (default: lbfgs)")
    p.add_argument("--probe-epochs", type=int, default=None, help="sgd solver epochs (default: 90)")
    p.add_argument("--probe-lr", type=float, default=None, help="sgd solver lr per 256 samples (default: 0.1)")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed for --random-init")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    # resume tests: SIGKILL this process once that many suite cache files are written
    p.add_argument("--debug-sigkill-after-cache-writes", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.checkpoint and not args.random_init:
        p.error("give --checkpoint, --random-init, or both (with --suite)")
    if args.data and (args.random_init and args.checkpoint or len(args.checkpoint or ()) > 1):
        p.error("--data evaluates one model: one --checkpoint or --random-init (several: use --suite)")
    if args.batch_size is not None and args.batch_size < 1:
        p.error(f"--batch-size {args.batch_size}: must be at least 1")
    if args.root and not args.suite:
        p.error("--root: --suite only (the folder a suite's dataset paths are relative to)")
    if args.suite and not (args.root and args.out):
        p.error("--suite needs --root (where its datasets live) and --out (a results folder)")
    given = [f"--{n}" for n in ("tasks", "classnames", "templates") if getattr(args, n) is not None]
    if args.suite and given:
        p.error(f"{', '.join(given)}: --data only; a suite file lists them per dataset")
    if args.suite and args.random_init and not (args.config or args.checkpoint):
        p.error("--random-init needs --config or a --checkpoint (the architecture to initialise)")
    if args.data and args.tasks is None:
        args.tasks = ",".join(TASKS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return evaluate(args)
    except (CheckpointError, ConfigError, FileNotFoundError, ValueError) as e:
        return report(e, 2)


def probe_config(args, base: LinearProbeConfig) -> LinearProbeConfig:
    """`base` with the --probe* options that were given."""
    given = {"solver": args.probe, "epochs": args.probe_epochs, "lr": args.probe_lr}
    return dataclasses.replace(base, **{k: v for k, v in given.items() if v is not None})


def random_model(run_cfg: RunConfig, seed: int, device: str, text_only: bool = False) -> torch.nn.Module:
    """The run's model, randomly initialised from `seed`: the untrained baseline (`text_only`: build_model)."""
    torch.manual_seed(seed)
    return build_model(run_cfg.model, run_cfg.objective.name, text_only=text_only).to(device).eval()


def check_checkpoint_file(path: str) -> None:
    if Path(path).exists() and not is_regular(path):
        # a FIFO or device named like a checkpoint would block or never end
        raise CheckpointError(f"{path}: not a regular file; refused as a checkpoint")


def evaluate(args) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.suite:
        return evaluate_suite(args)
    if not glob.has_magic(args.data) and not Path(args.data).exists():   # before any model is built
        raise FileNotFoundError(f"--data {args.data}: no such file or directory")
    if args.random_init and not args.config:
        sys.exit("--random-init needs --config (the model to initialise)")
    t0 = time.time()
    tasks = tuple(t.strip() for t in args.tasks.split(",") if t.strip())
    text = bool(set(tasks) & set(TEXT_TASKS))
    if text and not set(tasks) <= set(TEXT_TASKS):
        raise ValueError(f"--tasks {','.join(tasks)}: text tasks ({','.join(TEXT_TASKS)}) and image tasks "
                         "read different data; run them separately")
    if args.random_init:
        run_cfg = load_config(args.config)
        model = random_model(run_cfg, args.seed, args.device, text_only=text)
    else:
        args.checkpoint = args.checkpoint[0]
        check_checkpoint_file(args.checkpoint)
        model, run_cfg = load_model(args.checkpoint, args.config, args.device, text_only=text)
    if text:
        return evaluate_text(args, model, run_cfg, tasks, t0)
    cfg = EvalConfig(data=args.data, tasks=tasks, batch_size=args.batch_size or run_cfg.eval.batch_size,
                     classnames=args.classnames, templates=args.templates,
                     probe=probe_config(args, LinearProbeConfig()))
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


def evaluate_text(args, model, run_cfg: RunConfig, tasks: tuple[str, ...], t0: float) -> int:
    """The text tower alone on a GLUE file or folder (trainer/evaluation/text.py); `model` was built
    text-only, so the image tower was never built or loaded."""
    if not model.uses_text:
        raise ValueError(f"{run_cfg.objective.name}: the model has no text tower; the text tasks do not apply")
    from pipeline.tokenizer import Tokenizer
    tokenizer, batch = Tokenizer(), args.batch_size or run_cfg.eval.batch_size
    results: dict = {"data": args.data}
    if "sts" in tasks:
        results["sts"] = sts(model, tokenizer, Path(args.data), batch)
    if "text_probe" in tasks:
        results["text_probe"] = text_probe(model, tokenizer, Path(args.data), batch,
                                           probe_config(args, LinearProbeConfig()))
    results.update(checkpoint="random-init" if args.random_init else str(args.checkpoint),
                   objective=run_cfg.objective.name, model=run_cfg.model.name, seconds=round(time.time() - t0, 2))
    if args.out:
        save_results(results, args.out)
    short = {}
    if "sts" in results:
        short["sts_spearman"] = {f: round(results["sts"][f]["spearman"], 4) for f in ("embed", "eot")}
    if "text_probe" in results:
        short["text_probe_top1"] = {f: round(results["text_probe"][f]["top1"], 2) for f in ("embed", "eot")}
    print(json.dumps({"checkpoint": results["checkpoint"], **short, "out": args.out}, indent=1))
    return 0


def evaluate_suite(args) -> int:
    """Every checkpoint (and the random baseline) on every dataset of the suite: results folder."""
    from trainer.dataclass_io import to_dict
    from trainer.evaluation.cache import run_model_key
    from trainer.evaluation.suite import load_suite
    from trainer.evaluation.suite_report import markdown, write_outputs
    from trainer.evaluation.suite_run import SuiteModel, run_suite
    t0 = time.time()
    suite = load_suite(args.suite)
    suite.batch_size, suite.probe = args.batch_size or suite.batch_size, probe_config(args, suite.probe)
    if not Path(args.root).is_dir():
        raise FileNotFoundError(f"--root {args.root}: no such directory")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise ValueError(f"--out {args.out}: with --suite, --out is a folder")
    names = list(args.checkpoint or [])
    if len(set(names)) != len(names):
        raise ValueError("--checkpoint: the same checkpoint is named twice")
    models = []

    def add(name, model, run_cfg):
        models.append(SuiteModel(name, model, run_cfg, run_model_key(model, run_cfg)))

    # a suite of text sets only never builds or loads an image tower (a model without a text tower is
    # loaded whole, and the suite lists the text tasks as not applicable to it)
    text_only = all(d.text for d in suite.datasets)
    for path in names:
        check_checkpoint_file(path)
        add(path, *load_model(path, None, args.device, text_only=text_only))
    if args.random_init:
        run_cfg = load_config(args.config) if args.config else models[0].run_cfg
        add("random-init", random_model(run_cfg, args.seed, args.device, text_only=text_only), run_cfg)
    results = run_suite(suite, args.root, models, args.out, progress=not args.no_progress,
                        sigkill_after_writes=args.debug_sigkill_after_cache_writes)
    results.update(suite=str(args.suite), root=str(args.root), batch_size=suite.batch_size,
                   probe=to_dict(suite.probe), seconds=round(time.time() - t0, 2))
    title = f"{Path(args.suite).stem}: {suite.description}" if suite.description else Path(args.suite).stem
    paths = write_outputs(results, args.out, title)
    print(markdown(results, title))
    print(json.dumps(paths, indent=1))
    failed = [d["dataset"] for d in results["datasets"] if d["status"] == "failed"]
    if failed:
        print(f"error: {len(failed)} dataset(s) could not be evaluated ({', '.join(failed)}); the others are "
              f"in {args.out}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
