"""The train step and the loop: accumulation, mixed precision, non-finite skipping, checkpoints.

The loop asks small policies (trainer/policies.py) when to log, checkpoint, evaluate or stop, and
meters (trainer/metrics.py) for throughput, MFU and nCLIP cluster usage; the step itself only computes.

Gradient accumulation: each micro-batch's contrastive loss only sees the negatives of that
micro-batch (gathered across ranks), so accumulating k micro-batches of size b is NOT the same
objective as one batch of k*b; it only saves memory at the cost of fewer negatives.

Resume (which checkpoint, and which configuration changes are allowed: trainer/resume.py). The
step counter counts optimizer steps taken and never goes back (checkpoint names, metrics lines).
Progress is the schedule's position in epochs: a checkpoint stores its schedule step and steps per
epoch. Resumed with the same batch size, world size and accumulation, everything continues bit for
bit. With a different one, the schedule position is converted to the same fraction of an epoch at
the new steps per epoch, so the learning-rate curve continues where it was and the run ends after
the configured number of epochs (the loader restarts at the same epoch fraction, see
pipeline/loader.py). The non-finite streak is saved too: a kill does not reset the count.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Literal

import torch
import torch.distributed as dist
from torch import nn

from trainer import checkpoint as ckpt
from trainer.batches import endless, to_device
from trainer.dataclass_io import to_dict
from trainer.distributed import rank0_only
from trainer.metrics import (ClusterUsageMeter, MetricsLogger, RunningMean, ThroughputMeter, fmt_summary,
                             model_flops_utilisation)
from trainer.objectives import CLUSTER_COUNTS
from trainer.optim import WarmupCosine
from trainer.policies import (CollapseWatch, UniformWatch, DebugFaults, Every, NonFiniteLossError, NonFinitePolicy, StopSignals,
                              last_good_text)

if TYPE_CHECKING:
    from trainer.flops import FlopCount
    from trainer.config import RunConfig

__all__ = ["Components", "NonFiniteLossError", "StepResult", "TrainConfig", "TrainState", "Trainer"]


@dataclass
class TrainConfig:
    seed: int = 0
    precision: Literal["auto", "bf16", "fp16", "fp32"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    compile: bool = False              # torch.compile the model
    find_unused_parameters: bool = False   # DDP; only for objectives that leave parameters unused
    static_graph: bool = False
    log_every: int = 10                # steps between metrics lines (each costs a device sync)
    max_nonfinite: int = 5             # consecutive non-finite steps before the run stops
    peak_tflops: float | None = None   # per-device peak for MFU; None = look the device up
    torch_threads: int | None = None   # CPU intra-op threads per rank

    def __post_init__(self):
        if self.log_every < 1:
            raise ValueError("log_every must be >= 1")
        if self.max_nonfinite < 1:
            raise ValueError(f"max_nonfinite must be >= 1, got {self.max_nonfinite}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1 or null, got {self.torch_threads}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"peak_tflops must be > 0 or null, got {self.peak_tflops}")


@dataclass
class Components:
    """Everything the loop needs, built by trainer/components.py."""
    cfg: RunConfig
    model: nn.Module              # the bare model (checkpoints, clamp, evaluation)
    train_model: nn.Module        # what is called in the step: DDP and/or compiled wrapper of `model`
    objective: Callable[[dict], dict]
    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosine
    loader: object                # pipeline.loader.SLIPLoader
    device: torch.device
    rank: int = 0
    world_size: int = 1
    amp_dtype: torch.dtype | None = None
    scaler: torch.amp.GradScaler | None = None
    total_steps: int = 1
    flops_per_sample: FlopCount | None = None   # FLOPs per sample, for MFU (trainer/flops.py)
    peak_flops: float | None = None          # per device
    evaluate: Callable[[nn.Module, int], dict] | None = None
    manifest_sha256: str | None = None       # of the data set's manifest file, stored in checkpoints
    on_device: Callable[[dict], dict] | None = None   # batch step on the training device (finetuning's mixing)
    eval_every_steps: int | None = None      # overrides eval.every_steps (finetuning: once an epoch)


@dataclass
class TrainState:
    step: int = 0                 # optimizer steps taken (skipped non-finite steps included)
    samples_seen: int = 0
    nonfinite_total: int = 0
    nonfinite_in_a_row: int = 0
    checkpoints_written: int = 0


@dataclass
class StepResult:
    values: dict[str, torch.Tensor]   # this rank's loss terms, accuracies and the grad norm
    lr: float                         # the rate the step ran at
    skipped: bool                     # non-finite on some rank: no update anywhere
    stop: bool                        # some rank received a stop signal


class Trainer:
    def __init__(self, c: Components):
        self.c = c
        self.cfg = cfg = c.cfg
        self.state = TrainState()
        self.ckpt_dir = Path(cfg.out_dir) / "checkpoints"
        self.params = [p for p in c.model.parameters() if p.requires_grad]
        self.signals = StopSignals()
        self.faults = DebugFaults(cfg.debug, cfg.out_dir, c.rank)
        self.objective = self.faults.wrap_objective(c.objective, lambda: self.state.step + 1)
        self.nonfinite = NonFinitePolicy(cfg.train.max_nonfinite)
        self.log_due = Every(cfg.train.log_every)
        self.checkpoint_due = Every(cfg.checkpoint.every_steps)
        eval_every = cfg.eval.every_steps if c.eval_every_steps is None else c.eval_every_steps
        self.eval_due = Every(eval_every if c.evaluate is not None else 0)
        self.cluster_usage = ClusterUsageMeter(CLUSTER_COUNTS)   # nCLIP only; read at log steps
        self.collapse_watch = CollapseWatch(cfg.objective.nclip_min_usage)
        self.uniform_watch = UniformWatch(cfg.objective.nclip_min_kl)
        self._metrics: MetricsLogger | None = None
        self._metrics_opened = False
        self.step_offset = 0      # steps taken minus the schedule position; non-zero after a converted resume
        self.last_checkpoint: Path | None = None   # the newest checkpoint known to be good

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps per epoch at this batch size, world size and accumulation."""
        return max(1, self.c.loader.steps_per_epoch // self.cfg.optim.accum_steps)

    @property
    def end_step(self) -> int:
        """The step the run ends at: the end of the schedule (shifted by a converted resume) or
        `optim.max_steps`, whichever comes first."""
        end = self.c.total_steps + self.step_offset
        return min(end, self.cfg.optim.max_steps) if self.cfg.optim.max_steps else end

    @property
    def metrics(self) -> MetricsLogger:
        """Opened on first use (so `save()` works before `fit()`) at the current step; the first
        opening drops the log lines past it (a resumed run), a reopening appends."""
        if self._metrics is None:
            self._metrics = MetricsLogger(self.cfg.out_dir, self.c.rank, self.end_step,
                                          start_step=self.state.step, truncate=not self._metrics_opened)
            self._metrics_opened = True
        return self._metrics

    def _close_metrics(self, summary: str | None = None) -> None:
        self.metrics.close(summary)
        self._metrics = None

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
            # objective state (nCLIP's teacher centre: the same on every rank, all-reduced)
            "objective": c.objective.state_dict() if hasattr(c.objective, "state_dict") else {},
            "step": self.state.step,
            "samples_seen": self.state.samples_seen,
            "nonfinite_total": self.state.nonfinite_total,
            "nonfinite_in_a_row": self.state.nonfinite_in_a_row,
            "steps_per_epoch": self.steps_per_epoch,   # with the scheduler's step: the epochs done
            "manifest_sha256": c.manifest_sha256,
            "world_size": c.world_size,
            "per_rank": gathered,
            "config": to_dict(self.cfg),   # the run is self-describing even without config.yaml
        }

    def load_state_dict(self, s: dict, source: str) -> None:
        c = self.c
        ckpt.check_model_state(c.model, s["model"], source)
        if not ckpt.weights_finite(s["model"]):
            raise ckpt.CheckpointError(f"{source}: the checkpoint's weights are not finite; resume from an earlier one")
        c.model.load_state_dict(s["model"])
        try:
            c.optimizer.load_state_dict(s["optimizer"])
        except ValueError as e:   # torch names only group sizes; say what usually causes it
            raise ckpt.CheckpointError(
                f"{source}: its optimizer state does not fit this run's trained parameters ({e}); usually a "
                "config change allowed on resume altered which parameters train (such as model.nclip_prototypes): "
                "start a new run with model.init_from instead") from e
        c.scheduler.load_state_dict(s["scheduler"])
        if c.scaler is not None and s.get("scaler"):
            c.scaler.load_state_dict(s["scaler"])
        if hasattr(c.objective, "load_state_dict"):
            c.objective.load_state_dict(s.get("objective", {}))
        self.state.step = int(s["step"])
        self.state.samples_seen = int(s["samples_seen"])
        self.state.nonfinite_total = int(s.get("nonfinite_total", 0))
        self.state.nonfinite_in_a_row = int(s.get("nonfinite_in_a_row", 0))
        saved_spe = _saved_steps_per_epoch(s)
        if saved_spe and saved_spe != self.steps_per_epoch:
            # Another batch size, world size or accumulation: the same fraction of an epoch, in new steps.
            position = c.scheduler.step_count * self.steps_per_epoch // saved_spe
            if c.rank == 0:
                print(f"{source}: {saved_spe} steps per epoch then, {self.steps_per_epoch} now; the schedule "
                      f"continues at epoch {position / self.steps_per_epoch:.3f} (schedule step {position} of "
                      f"{c.scheduler.total_steps})", flush=True)
            c.scheduler.load_state_dict({"step_count": position})
        self.step_offset = self.state.step - c.scheduler.step_count
        self.last_checkpoint = Path(source)
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
        """Checkpoint the current step. Every rank stops together, with the same error, when the
        weights are not finite or rank 0 cannot write (a full disk)."""
        c, st = self.c, self.state
        if not ckpt.weights_finite(c.model.state_dict()):   # identical on every rank: all raise
            raise NonFiniteLossError(f"the weights at step {st.step} are not finite; no checkpoint written. "
                                     f"{last_good_text(self.last_checkpoint)}")
        state = self.state_dict()   # collective: every rank takes part
        path = ckpt.checkpoint_path(self.ckpt_dir, st.step)

        def write() -> str | None:
            try:
                ckpt.save_checkpoint(state, self.ckpt_dir, st.step, self.cfg.checkpoint.keep_every)
            except ckpt.CheckpointError as e:
                return str(e)
            return None
        # the other ranks wait for the write with dist.rank0_wait_s, not the collectives' short timeout
        error = rank0_only(f"writing the checkpoint of step {st.step}", write)
        if error is not None:
            raise ckpt.CheckpointError(error)
        self.last_checkpoint = path
        st.checkpoints_written += 1
        self.metrics.event(st.step, "checkpoint", str(path))

    # ------------------------------------------------------------ one optimizer step

    def train_step(self, micro_batches: list[dict]) -> StepResult:
        """Forward/backward over the micro-batches, then step (or skip when non-finite)."""
        c, k = self.c, len(micro_batches)
        totals: dict[str, torch.Tensor] = {}
        self.cluster_usage.start_step()
        for i, batch in enumerate(micro_batches):
            sync = contextlib.nullcontext()
            if i < k - 1 and hasattr(c.train_model, "no_sync"):
                sync = c.train_model.no_sync()   # all-reduce only on the last micro-batch
            with sync:
                with torch.autocast(c.device.type, dtype=c.amp_dtype, enabled=c.amp_dtype is not None):
                    out = c.train_model(batch)
                    losses = self.objective(out)
                loss = losses["loss"].float() / k
                (c.scaler.scale(loss) if c.scaler is not None else loss).backward()
            self.cluster_usage.add(losses)
            for name, v in losses.items():
                if torch.is_tensor(v) and v.numel() == 1:
                    totals[name] = totals.get(name, 0) + v.detach().float() / k
        if c.scaler is not None:
            c.scaler.unscale_(c.optimizer)
        max_norm = self.cfg.optim.grad_clip if self.cfg.optim.grad_clip else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm, foreach=True)
        # Grads are identical on every rank after DDP's all-reduce, but the loss is local:
        # agree on "skip" so no rank steps while another does not.
        bad = (~torch.isfinite(totals["loss"]) | ~torch.isfinite(grad_norm)).float().reshape(1)
        # One small all-reduce carries both flags: "skip this step" and "a rank was asked to stop".
        flags = torch.cat([bad, torch.tensor([float(self.signals.requested)], device=bad.device)])
        if c.world_size > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        skipped, stop = (bool(f) for f in flags.tolist())
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
        lr = c.scheduler.lr
        c.scheduler.step()   # the schedule follows the step count, skipped steps included
        totals["grad_norm"] = grad_norm.detach().float()
        return StepResult(totals, lr, skipped, stop)

    # ------------------------------------------------------------ the loop

    def fit(self) -> TrainState:
        c, cfg, st = self.c, self.cfg, self.state
        end = self.end_step
        if st.step >= end:
            self._close_metrics(f"nothing to do: the run already finished {st.step} of {end} steps")
            return st
        self.metrics.advance(0)   # open the log now: the bar shows while the first step runs
        global_batch = cfg.data.batch_size * cfg.optim.accum_steps * c.world_size
        speed, mfu = ThroughputMeter(global_batch), RunningMean()
        start_step, last_loss = st.step, None
        if c.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(c.device)
        self.signals.install()
        stream = endless(c.loader)
        try:
            while st.step < end:
                with speed.waiting_for_data():
                    micro = [to_device(next(stream), c.device, cfg.data.text_padding)
                             for _ in range(cfg.optim.accum_steps)]
                    if c.on_device is not None:
                        micro = [c.on_device(m) for m in micro]
                result = self.train_step(micro)
                st.step += 1
                st.samples_seen += global_batch
                speed.step(self._step_flops(micro))
                if result.skipped:
                    self._record_nonfinite(result)
                else:
                    st.nonfinite_in_a_row = 0
                    if self.log_due(st.step) or st.step == end:
                        last_loss = self._log_step(result, speed, mfu)
                self.metrics.advance()
                if result.stop:
                    # Preemption: checkpoint now (every rank agreed via the flag), exit; rerun resumes.
                    self.save()
                    self.metrics.event(st.step, "stopped", f"signal received, checkpoint at step {st.step} "
                                       "written; rerun the same command to resume")
                    break
                if st.step < end:
                    if self.checkpoint_due(st.step):
                        self.save()
                    if self.eval_due(st.step):
                        self._evaluate()
                self.faults.after_step(st.step)
            else:
                self.save()
                if c.evaluate is not None:
                    self._evaluate()
        except BaseException:
            self._close_metrics()
            raise
        seconds = speed.elapsed()
        steps = st.step - start_step
        self._close_metrics(fmt_summary(steps, steps * global_batch, seconds,
                                        speed.total_wait / max(seconds, 1e-9), mfu.mean,
                                        st.checkpoints_written, st.nonfinite_total, last_loss))
        self.faults.after_fit(c.model)
        return st

    def _step_flops(self, micro: list[dict]) -> float:
        """Training FLOPs per sample of this rank's step, the text counted at the width it ran (the
        micro-batches are the same size); 0 without MFU."""
        c = self.c
        if not (c.flops_per_sample and c.peak_flops):
            return 0.0
        count = c.flops_per_sample
        return sum(count.train_at(m["text"].shape[1]) if "text" in m else count.train for m in micro) / len(micro)

    def _record_nonfinite(self, result: StepResult) -> None:
        st = self.state
        st.nonfinite_total += 1
        st.nonfinite_in_a_row += 1
        self.metrics.event(st.step, "nonfinite",
                           f"non-finite loss/gradient, step skipped ({st.nonfinite_in_a_row} in a row)",
                           loss=float(result.values["loss"]))
        self.nonfinite.check(st.nonfinite_in_a_row, st.step, self.last_checkpoint)

    def _log_step(self, result: StepResult, speed: ThroughputMeter, mfu: RunningMean) -> float:
        """One metrics line: global means of the step's values, rates of the window since the last."""
        c, cfg, st = self.c, self.cfg, self.state
        window = speed.window()
        values, with_mfu = dict(result.values), bool(c.flops_per_sample and c.peak_flops)
        flops_per_sample = window.pop("flops_per_sample")
        if with_mfu:
            # averaged over the ranks with the values: their text widths differ with text_padding "longest"
            values["flops_per_sample"] = torch.tensor(flops_per_sample, device=c.device)
        rec = self._global_mean(values)
        self.faults.before_usage_read(st.step, self.cluster_usage.step, self.cluster_usage.window)
        usage = self.cluster_usage.read(c.world_size)
        for mod, u in usage.items():
            rec[f"nclip_{mod}_clusters_batch"] = u["clusters_batch"]
            rec[f"nclip_{mod}_clusters_window"] = u["clusters_window"]
        samples_per_epoch = max(1, c.loader.steps_per_epoch * cfg.data.batch_size * c.world_size)
        rec.update(lr=result.lr, epoch=st.samples_seen / samples_per_epoch, samples_seen=st.samples_seen,
                   **window)
        if c.device.type == "cuda":
            rec["gpu_mem_gb"] = torch.cuda.max_memory_allocated(c.device) / 2**30
        if with_mfu:
            rec["mfu"] = model_flops_utilisation(rec["images_per_s"], rec.pop("flops_per_sample"), c.peak_flops,
                                                 c.world_size)
            mfu.add(rec["mfu"])
        bad = getattr(c.loader, "bad_samples", None)
        if isinstance(bad, int):
            rec["bad_samples"] = bad
        rec.update(self._samples_by_source())
        self.metrics.log(st.step, rec)
        for mod, message, fraction in self.collapse_watch.check(usage):
            self.metrics.event(st.step, "nclip_usage", message, modality=mod, fraction=fraction)
        entropy = {mod: rec[f"nclip_{mod}_sample_entropy"] for mod in usage if f"nclip_{mod}_sample_entropy" in rec}
        for mod, message, kl in self.uniform_watch.check(entropy, {mod: usage[mod]["k"] for mod in entropy}):
            self.metrics.event(st.step, "nclip_uniform", message, modality=mod, kl=kl)
        speed.restart()
        return rec["loss"]

    def _samples_by_source(self) -> dict[str, int]:
        """Samples handed out so far per data source, summed over ranks ("samples_seen/<name>"),
        when the run reads several sources."""
        c = self.c
        names, counts = getattr(c.loader, "source_names", None), getattr(c.loader, "samples_by_source", None)
        if not names or counts is None or len(names) < 2:
            return {}
        vec = torch.tensor(counts, dtype=torch.int64, device=c.device)    # a copy: the all-reduce is in place
        if c.world_size > 1:
            dist.all_reduce(vec)
        return {f"samples_seen/{n}": int(v) for n, v in zip(names, vec.tolist())}

    def _global_mean(self, values: dict[str, torch.Tensor]) -> dict[str, float]:
        names = sorted(values)
        vec = torch.stack([values[n].reshape(()) for n in names]).to(self.c.device)
        if self.c.world_size > 1:
            dist.all_reduce(vec)
            vec /= self.c.world_size
        return dict(zip(names, vec.tolist()))

    def _evaluate(self) -> None:
        """Rank 0 evaluates the bare model (no collectives inside); the other ranks wait for it with
        dist.rank0_wait_s, not the collectives' short timeout."""
        c = self.c

        def evaluate() -> None:
            was_training = c.model.training
            c.model.eval()
            with torch.no_grad(), torch.autocast(c.device.type, dtype=c.amp_dtype, enabled=c.amp_dtype is not None):
                results = c.evaluate(c.model, self.state.step) or {}
            c.model.train(was_training)
            if results:
                self.metrics.log(self.state.step, {f"eval/{k}": v for k, v in results.items()
                                                   if isinstance(v, (int, float))})
        rank0_only(f"evaluation at step {self.state.step}", evaluate)


def _saved_steps_per_epoch(s: dict) -> int | None:
    """Optimizer steps per epoch when the checkpoint was written: stored, or for checkpoints of
    earlier versions derived from the loader state and the stored accumulation."""
    if s.get("steps_per_epoch"):
        return int(s["steps_per_epoch"])
    try:
        loader = s["per_rank"][0]["loader"]
        accum = int(s["config"]["optim"]["accum_steps"])
        return max(1, int(loader["num_samples"]) // int(loader["world_size"]) // int(loader["batch_size"]) // accum)
    except (KeyError, IndexError, TypeError, ZeroDivisionError):
        return None
