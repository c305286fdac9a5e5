#!/usr/bin/env python
"""Train SLIP / CLIP / SimCLR / xCLIP: config -> run directory and resume -> components -> loop.

    python trainer/run.py --config trainer/configs/demo_slip.yaml out_dir=runs/x optim.lr=1e-3
    torchrun --nproc_per_node 8 trainer/run.py --config trainer/configs/slip_vit_b16.yaml
    srun python trainer/run.py --config ...            # rank/world size from the SLURM environment
    python trainer/run.py --config ... data.manifest=[a.json,b.json] data.weights=[1,0.5]   # a mixture (docs/DATASETS.md)

Resume rules (details: trainer/resume.py, trainer/loop.py):
- An out_dir holding checkpoints is resumed from its newest checkpoint that verifies (a damaged
  newer one is skipped with a warning); `--resume latest` insists on one, `--resume PATH` names one.
- `--resume none` in an out_dir holding an earlier run's checkpoints is refused; `--resume none
  --overwrite` moves that run into a dated folder beside out_dir first (nothing is deleted).
- The batch size, world size, accumulation, precision, compile, threads, cadences, evaluation and
  debug settings may change on resume (the schedule continues at the same epoch). Any other
  change, the data set's manifest included, is refused naming the keys unless
  `--allow-config-change KEY,...` names them.
- One trainer per out_dir: rank 0 holds a lock on `<out_dir>/train.lock` for the whole run.
- `config.yaml` is written once the resume is settled.

Exit status: 0 done, 2 configuration or run-directory refusal, 3 non-finite training, 4 checkpoint
unreadable or not writable (a full disk).
"""
from __future__ import annotations

import argparse
import errno
import os
import sys

from pipeline.cli import report, run_main
from pipeline.manifest import ShardError
from trainer import checkpoint as ckpt
from trainer.components import build_components
from trainer.config import ConfigError, load_config, save_config
from trainer.distributed import all_ranks, cleanup, init_distributed
from trainer.loop import NonFiniteLossError, Trainer
from trainer.resume import ResumeError, ResumeRequest, settle
from trainer.run_dir import RunDirBusy


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="YAML run configuration (trainer/configs/*.yaml)")
    p.add_argument("--resume", help="auto | latest | none | PATH (overrides checkpoint.resume)")
    p.add_argument("--overwrite", action="store_true",
                   help="with --resume none: move an earlier run in out_dir into a dated folder beside it")
    p.add_argument("--allow-config-change", default="", metavar="KEY,...",
                   help="config keys or sections that may differ from the resumed checkpoint's, e.g. optim.lr")
    p.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. optim.lr=1e-3")
    return p.parse_args(argv)


def _verification_line(manifest: str) -> str:
    """When the shards were last checked against the manifest's checksums (tools/verify_shards.py)."""
    from pipeline.integrity import last_verification
    v = last_verification(manifest)
    if v is None:
        return f"shards of {manifest}: never verified against its checksums (python tools/verify_shards.py {manifest})"
    state = "all match" if v.ok else f"{len(v.problems)} problem(s): rerun tools/verify_shards.py"
    return f"shards last verified {v.verified_at}: {v.shards} shards, {state}"


def _sources_comment(cfg, sums) -> str:
    """The saved config's record of the data: every manifest with its sha256 (what a resume checks)."""
    if cfg.data.train or sums is None:
        return ""
    sums = sums if isinstance(sums, list) else [sums]
    weights = cfg.data.weights or [1.0] * len(sums)
    return "".join(f"# data source: {path} sha256 {sha} weight {w:g}\n"
                   for path, sha, w in zip(cfg.data.manifests, sums, weights))


def _error(rank: int, error: BaseException, code: int, kind: str = "error", message: str | None = None) -> int:
    """One line from rank 0 (pipeline/cli.py: another rank's own failure too; the traceback under SLIP_DEBUG=1)."""
    return report(error, code, kind, rank, message)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides)
        if args.resume:
            cfg.checkpoint.resume = args.resume
    except ConfigError as e:
        return report(e, 2, "config error")     # before the group exists: the rank comes from the environment
    request = ResumeRequest(cfg.checkpoint.resume, args.overwrite,
                            tuple(k.strip() for k in args.allow_config_change.split(",") if k.strip()))
    info = init_distributed(cfg.dist)   # once: the group and this rank's device
    rank = info.rank
    lock = None
    try:
        lock, choice = settle(cfg, request, rank)
        trainer = Trainer(build_components(cfg, info))
        c = trainer.c
        if choice.path is not None:
            state = all_ranks("loading the checkpoint", lambda: choice.state if choice.state is not None
                              else ckpt.load_checkpoint(choice.path, verify=False))   # long limit: ranks differ
            trainer.load_state_dict(state, str(choice.path))
            state = choice.state = None    # the optimizer and model hold their copies now
            if rank == 0:
                print(f"resumed from {choice.path} at step {trainer.state.step}", flush=True)
        if rank == 0:
            save_config(cfg, os.path.join(cfg.out_dir, "config.yaml"), _sources_comment(cfg, c.manifest_sha256))
            n_params = sum(p.numel() for p in c.model.parameters())
            n_frozen = sum(p.numel() for p in c.model.parameters() if not p.requires_grad)
            frozen = f" ({n_frozen / 1e6:.1f}M of them fixed)" if n_frozen else ""
            print(f"{cfg.objective.name}: {n_params / 1e6:.1f}M parameters{frozen}, {c.world_size} rank(s) on {c.device}, "
                  f"global batch {cfg.data.batch_size * cfg.optim.accum_steps * c.world_size}, "
                  f"{trainer.end_step} steps, out {cfg.out_dir}", flush=True)
            if not cfg.data.train:
                for manifest in cfg.data.manifests:
                    print(_verification_line(manifest), flush=True)
        trainer.fit()
    except ConfigError as e:
        return _error(rank, e, 2, kind="config error")
    except (ResumeError, RunDirBusy) as e:
        return _error(rank, e, 2)
    except ShardError as e:          # missing shard, size or index mismatch: the data set, not the code
        return _error(rank, e, 2, kind="data error")
    except NonFiniteLossError as e:
        return _error(rank, e, 3)
    except ckpt.CheckpointError as e:
        return _error(rank, e, 4)
    except OSError as e:
        if e.errno != errno.ENOSPC:
            raise
        return _error(rank, e, 4, message=f"No space left on device writing {e.filename or 'into ' + cfg.out_dir}; "
                                          "free space and rerun the same command to resume from the last checkpoint")
    finally:
        if lock is not None:
            lock.release()
        cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
