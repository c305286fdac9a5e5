"""The train step and the loop: accumulation, mixed precision, non-finite skipping, checkpoints.

Gradient accumulation: each micro-batch's contrastive loss only sees the negatives of that
micro-batch (gathered across ranks), so accumulating k micro-batches of size b is NOT the same
objective as one batch of k*b; it only saves memory at the cost of fewer negatives.
"""
from __future__ import annotations

import contextlib
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from trainer import checkpoint as ckpt
from trainer.config import RunConfig, to_dict
from trainer.metrics import MetricsLogger, fmt_summary


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class Components:
    """Everything the loop needs, built by trainer/run.py."""
    cfg: RunConfig
    model: nn.Module              # the bare model (checkpoints, clamp, evaluation)
    train_model: nn.Module        # what is called in the step: DDP and/or compiled wrapper of `model`
    objective: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: object             # trainer.optim.WarmupCosine
    loader: object                # pipeline.loader.SLIPLoader
    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    total_steps: int = 1
    flops_per_sample: float | None = None   # forward+backward FLOPs per sample, for MFU
    peak_flops: float | None = None          # per device
    evaluate: Callable[[nn.Module, int], dict] | None = None


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps taken (skipped non-finite steps included)
    samples_seen: int = 0
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    checkpoints_written: int = 0
    extra: dict = field(default_factory=dict)


def _batches(loader) -> Iterator[dict]:
    """Endless stream over epochs; the loader itself tracks the epoch and the position."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty and getattr(loader, "steps_per_epoch", 1) == 0:
            raise RuntimeError("the loader yields no batches (is the manifest empty?)")


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class Trainer:
    def __init__(self, c: Components):
        self.c = c
        self.cfg = c.cfg
        self.state = TrainState()
        self.ckpt_dir = Path(self.cfg.out_dir) / "checkpoints"
        self.params = [p for p in c.model.parameters() if p.requires_grad]
        self.stop_signal: int | None = None   # set by SIGTERM/SIGUSR1 (SLURM preemption, scancel)
        self.stop_now = False

    def _request_stop(self, signum, frame) -> None:
        self.stop_signal = signum

    # ------------------------------------------------------------ checkpoint state

    def state_dict(self) -> dict:
        """This rank's full state; rank 0 adds the per-rank parts gathered from all ranks."""
        c = self.c
        per_rank = {"rng": ckpt.rng_state(), "loader": c.loader.state_dict()}
        if c.world_size > 1:
            gathered = [None] * c.world_size
            dist.all_gather_object(gathered, ckpt.to_safe(per_rank))
        else:
            gathered = [per_rank]
        return {
            "model": c.model.state_dict(),
            "optimizer": c.optimizer.state_dict(),
            "scheduler": c.scheduler.state_dict(),
            "scaler": c.scaler.state_dict() if c.scaler is not None else None,
            "step": self.state.step,
            "samples_seen": self.state.samples_seen,
            "nonfinite_total": self.state.nonfinite_total,
            "world_size": c.world_size,
            "per_rank": gathered,
            "config": to_dict(self.cfg),   # the run is self-describing even without config.yaml
        }

    def load_state_dict(self, s: dict, source: str) -> None:
        c = self.c
        ckpt.check_model_state(c.model, s["model"], source)
        c.model.load_state_dict(s["model"])
        c.optimizer.load_state_dict(s["optimizer"])
        c.scheduler.load_state_dict(s["scheduler"])
        if c.scaler is not None and s.get("scaler"):
            c.scaler.load_state_dict(s["scaler"])
        self.state.step = int(s["step"])
        self.state.samples_seen = int(s["samples_seen"])
        self.state.nonfinite_total = int(s.get("nonfinite_total", 0))
        per_rank = s["per_rank"]
        if len(per_rank) == c.world_size:
            mine = per_rank[c.rank]
            ckpt.set_rng_state(mine["rng"])
            c.loader.load_state_dict(mine["loader"])
        else:
            # A different world size re-shards the data: the stream cannot continue exactly.
            if c.rank == 0:
                print(f"warning: {source} was written by {len(per_rank)} ranks, now {c.world_size}; "
                      "the data order restarts from the epoch position of rank 0", flush=True)
            c.loader.load_state_dict(per_rank[0]["loader"])

    def save(self) -> None:
        state = self.state_dict()   # collective: every rank takes part
        if self.c.rank == 0:
            path = ckpt.save_checkpoint(state, self.ckpt_dir, self.state.step, self.cfg.checkpoint.keep_every)
            self.state.checkpoints_written += 1
            self.metrics.event(self.state.step, "checkpoint", str(path))
        if self.c.world_size > 1:
            dist.barrier()

    # ------------------------------------------------------------ one optimizer step

    def train_step(self, micro_batches: list[dict]) -> tuple[dict, bool, float]:
        """Forward/backward over the micro-batches, then step (or skip when non-finite)."""
        c, k = self.c, len(micro_batches)
        inject = (self.state.step + 1) in self.cfg.debug.inject_nan_at_steps
        totals: dict[str, torch.Tensor] = {}
        for i, batch in enumerate(micro_batches):
            sync = contextlib.nullcontext()
            if i < k - 1 and hasattr(c.train_model, "no_sync"):
                sync = c.train_model.no_sync()   # all-reduce only on the last micro-batch
            with sync:
                with torch.autocast(c.device.type, dtype=c.amp_dtype, enabled=c.amp_dtype is not None):
                    out = c.train_model(batch)
                    losses = c.objective(out)
                loss = losses["loss"].float() / k
                if inject:
                    loss = loss * float("nan")
                (c.scaler.scale(loss) if c.scaler is not None else loss).backward()
            for name, v in losses.items():
                if torch.is_tensor(v) and v.numel() == 1:
                    totals[name] = totals.get(name, 0) + v.detach().float() / k
            if inject:
                totals["loss"] = totals["loss"] * float("nan")
        if c.scaler is not None:
            c.scaler.unscale_(c.optimizer)
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        # Grads are identical on every rank after DDP's all-reduce, but the loss is local:
        # agree on "skip" so no rank steps while another does not.
        bad = (~torch.isfinite(totals["loss"]) | ~torch.isfinite(grad_norm)).float().reshape(1)
        # One small all-reduce carries both flags: "skip this step" and "a rank was asked to stop".
        flags = torch.cat([bad, torch.tensor([float(self.stop_signal is not None)], device=bad.device)])
        if c.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        skipped, self.stop_now = (bool(f) for f in flags.tolist())
        if skipped:
            c.optimizer.zero_grad(set_to_none=True)
            if c.scaler is not None:
                c.scaler.update()
        else:
            if c.scaler is not None:
                c.scaler.step(c.optimizer)
                c.scaler.update()
            else:
                c.optimizer.step()
            c.optimizer.zero_grad(set_to_none=True)
            if hasattr(c.model, "clamp_logit_scale"):
                c.model.clamp_logit_scale()
        lr = c.optimizer.param_groups[0]["lr"]
        c.scheduler.step()   # the schedule follows the step count, skipped steps included
        totals["grad_norm"] = grad_norm.detach().float()
        return totals, skipped, lr

    # ------------------------------------------------------------ the loop

    def _global_mean(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        names = sorted(values)
        vec = torch.stack([values[n].reshape(()) for n in names]).to(self.c.device)
        if self.c.world_size > 1:
            dist.all_reduce(vec)
            vec /= self.c.world_size
        return dict(zip(names, vec.tolist()))

    def fit(self) -> TrainState:
        c, cfg, st = self.c, self.cfg, self.state
        self.metrics = MetricsLogger(cfg.out_dir, c.rank, c.total_steps, start_step=st.step)
        accum = cfg.optim.accum_steps
        global_batch = cfg.data.batch_size * accum * c.world_size
        stream = _batches(c.loader)
        t_start = time.perf_counter()
        start_step = st.step
        window = {"t": time.perf_counter(), "wait": 0.0, "steps": 0}
        total_wait = 0.0
        last_loss = None
        mfu_sum, mfu_n = 0.0, 0
        if c.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(c.device)
        if st.step >= c.total_steps:
            self.metrics.close(f"nothing to do: the run already finished {st.step} of {c.total_steps} steps")
            return st
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._request_stop)
        try:
            while st.step < c.total_steps:
                t0 = time.perf_counter()
                micro = [_to_device(next(stream), c.device) for _ in range(accum)]
                wait = time.perf_counter() - t0
                window["wait"] += wait
                total_wait += wait
                values, skipped, lr = self.train_step(micro)
                st.step += 1
                st.samples_seen += global_batch
                window["steps"] += 1
                if skipped:
                    st.nonfinite_total += 1
                    st.nonfinite_in_a_row += 1
                    self.metrics.event(st.step, "nonfinite",
                                       f"non-finite loss/gradient, step skipped ({st.nonfinite_in_a_row} in a row)",
                                       loss=float(values["loss"]))
                    if st.nonfinite_in_a_row >= cfg.train.max_nonfinite:
                        raise NonFiniteLossError(
                            f"{st.nonfinite_in_a_row} non-finite steps in a row (last at step {st.step}); "
                            f"stopping. The last good checkpoint is in {self.ckpt_dir} "
                            "(lower the lr, enable optim.grad_clip, or check the data).")
                else:
                    st.nonfinite_in_a_row = 0
                    if st.step % cfg.train.log_every == 0 or st.step == c.total_steps:
                        now = time.perf_counter()
                        dt = now - window["t"]
                        rec = self._global_mean(values)
                        last_loss = rec["loss"]
                        rec.update(lr=lr, epoch=st.samples_seen / max(1, c.loader.steps_per_epoch * cfg.data.batch_size * c.world_size),
                                   samples_seen=st.samples_seen,
                                   step_time=dt / window["steps"],
                                   images_per_s=window["steps"] * global_batch / dt,
                                   data_wait=window["wait"] / dt)
                        if c.device.type == "cuda":
                            rec["gpu_mem_gb"] = torch.cuda.max_memory_allocated(c.device) / 2**30
                        if c.flops_per_sample and c.peak_flops:
                            rec["mfu"] = rec["images_per_s"] * c.flops_per_sample / (c.peak_flops * c.world_size)
                            mfu_sum, mfu_n = mfu_sum + rec["mfu"], mfu_n + 1
                        bad = getattr(c.loader, "bad_samples", None)
                        if isinstance(bad, int):
                            rec["bad_samples"] = bad
                        self.metrics.log(st.step, rec)
                        window = {"t": time.perf_counter(), "wait": 0.0, "steps": 0}
                self.metrics.advance()
                if self.stop_now:
                    # Preemption: checkpoint now (every rank agreed via the flag), exit; rerun resumes.
                    self.save()
                    self.metrics.event(st.step, "stopped", f"signal received, checkpoint at step {st.step} "
                                       "written; rerun the same command to resume")
                    break
                if cfg.checkpoint.every_steps and st.step % cfg.checkpoint.every_steps == 0 \
                        and st.step < c.total_steps:
                    self.save()
                if c.evaluate is not None and cfg.eval.every_steps and st.step % cfg.eval.every_steps == 0 \
                        and st.step < c.total_steps:
                    self._evaluate()
                if cfg.debug.sigkill_at_step is not None and st.step == cfg.debug.sigkill_at_step:
                    os.kill(os.getpid(), signal.SIGKILL)
            else:
                self.save()
                if c.evaluate is not None:
                    self._evaluate()
        except BaseException:
            self.metrics.close()
            raise
        seconds = time.perf_counter() - t_start
        steps = st.step - start_step
        summary = fmt_summary(steps, steps * global_batch, seconds, total_wait / max(seconds, 1e-9),
                              mfu_sum / mfu_n if mfu_n else None, st.checkpoints_written,
                              st.nonfinite_total, last_loss)
        self.metrics.close(summary)
        if cfg.debug.save_rank_params:
            torch.save(c.model.state_dict(), Path(cfg.out_dir) / f"rank{c.rank}_params.pt")
        return st

    def _evaluate(self) -> None:
        """Rank 0 evaluates the bare model (no collectives inside); the other ranks wait."""
        c = self.c
        if c.rank == 0:
            was_training = c.model.training
            c.model.eval()
            with torch.no_grad(), torch.autocast(c.device.type, dtype=c.amp_dtype, enabled=c.amp_dtype is not None):
                results = c.evaluate(c.model, self.state.step) or {}
            c.model.train(was_training)
            if results:
                self.metrics.log(self.state.step, {f"eval/{k}": v for k, v in results.items()
                                                   if isinstance(v, (int, float))})
        if c.world_size > 1:
            dist.barrier()
