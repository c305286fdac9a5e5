"""What a user sees: metrics.jsonl, TensorBoard events (if installed), a progress bar, a summary;
and the meters behind the numbers (throughput, data wait, MFU).

Only rank 0 writes. On resume, lines past the resumed step are dropped so that metrics.jsonl reads
as one unbroken run. History is never rewritten in place: the trimmed file is written beside it and
renamed over it in one step, so a kill at any moment leaves the old or the new file, both whole.
"""
from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from pipeline.files import atomic_output

# Loss-like keys shown in the bar (the rest goes to the file only).
_BAR_KEYS = ("loss", "clip_loss", "ssl_loss", "nclip_loss")


class MetricsLogger:
    """`truncate=False` appends without dropping later lines (reopening the log of a running run)."""

    def __init__(self, out_dir: str | Path, rank: int, total_steps: int, start_step: int = 0,
                 truncate: bool = True):
        self.enabled = rank == 0
        self.path = Path(out_dir) / "metrics.jsonl"
        self.start_step, self.total_steps = start_step, total_steps
        self.tb = self.bar = None
        if not self.enabled:
            return
        if truncate:
            self._truncate_after(start_step)
        self.file = open(self.path, "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(out_dir) / "tb"), purge_step=start_step + 1)
        except ImportError:  # tensorboard is optional
            self.tb = None
        self.bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step",
                        dynamic_ncols=True, smoothing=0.1)

    def _truncate_after(self, step: int) -> None:
        if not self.path.exists():
            return
        text = self.path.read_text()
        lines = text.splitlines()
        kept = []
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by a kill
                continue
            if rec.get("step", step + 1) <= step:   # summaries (no step) belong to the old run
                kept.append(line)
        if len(kept) == len(lines) and text.endswith("\n"):
            return                                  # nothing to drop: appending continues the file
        with atomic_output(self.path) as tmp:
            tmp.write_text("".join(l + "\n" for l in kept))

    def log(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "time": round(time.time(), 3), **values}
        self.file.write(json.dumps(rec, default=_plain) + "\n")
        if self.tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    self.tb.add_scalar(f"train/{k}", v, step)
        shown = {k: f"{values[k]:.4f}" for k in _BAR_KEYS if k in values}
        if "images_per_s" in values:
            shown["img/s"] = f"{values['images_per_s']:.1f}"
        if "data_wait" in values:
            shown["wait"] = f"{100 * values['data_wait']:.0f}%"
        if shown:
            self.bar.set_postfix(shown, refresh=False)

    def event(self, step: int, kind: str, message: str, **extra) -> None:
        """A non-periodic record (non-finite loss, checkpoint, evaluation)."""
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "event": kind, "message": message, **extra},
                                   default=_plain) + "\n")
        self.bar.write(f"[step {step}] {kind}: {message}")

    def advance(self, n: int = 1) -> None:
        if self.enabled:
            self.bar.update(n)

    def close(self, summary: str | None = None) -> None:
        if not self.enabled:
            return
        self.bar.close()
        if summary:
            print(summary, flush=True)
            self.file.write(json.dumps({"event": "summary", "message": summary}) + "\n")
        self.file.close()
        if self.tb is not None:
            self.tb.close()


class ThroughputMeter:
    """Step time, images/s and the share of wall time blocked on data, per logging window and for
    the whole run. The loop reads a window at each metrics line and restarts it once logged."""

    def __init__(self, samples_per_step: int):
        self.samples_per_step = samples_per_step
        self.start = time.perf_counter()
        self.total_wait = 0.0
        self.restart()

    def restart(self) -> None:
        self.window_start, self.window_wait, self.window_steps = time.perf_counter(), 0.0, 0
        self.window_flops = 0.0      # sum over the window's steps of their FLOPs per sample

    @contextlib.contextmanager
    def waiting_for_data(self):
        t0 = time.perf_counter()
        yield
        wait = time.perf_counter() - t0
        self.window_wait += wait
        self.total_wait += wait

    def step(self, flops_per_sample: float = 0.0) -> None:
        """One step done; `flops_per_sample`: its training FLOPs per sample on this rank (for MFU;
        they vary with the text's width)."""
        self.window_steps += 1
        self.window_flops += flops_per_sample

    def window(self) -> dict[str, float]:
        seconds = time.perf_counter() - self.window_start
        return {"step_time": seconds / self.window_steps,
                "images_per_s": self.window_steps * self.samples_per_step / seconds,
                "data_wait": self.window_wait / seconds,
                "flops_per_sample": self.window_flops / self.window_steps}

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


class ClusterUsageMeter:
    """nCLIP cluster usage per modality: the argmax histograms the objective returns, summed over the
    micro-batches of a step and over the logging window on the device, so that no step waits for
    the host. `read()` is the only synchronisation: at a log step it all-reduces the histograms
    (the global batch is the union of the ranks' batches, so clusters are counted on the summed
    histogram, never averaged from per-rank counts) and restarts the window. Collective: every rank
    calls it at the same steps. Does nothing for objectives without nCLIP."""

    def __init__(self, count_keys: dict[str, str]):
        self.count_keys = count_keys          # modality -> key of the objective's histogram
        self.step: dict[str, torch.Tensor] = {}
        self.window: dict[str, torch.Tensor] = {}

    def start_step(self) -> None:
        self.step = {}

    def add(self, values: dict) -> None:
        for mod, key in self.count_keys.items():
            counts = values.get(key)
            if counts is None:
                continue
            counts = counts.detach()
            self.step[mod] = self.step[mod] + counts if mod in self.step else counts.clone()
            self.window[mod] = self.window[mod] + counts if mod in self.window else counts.clone()

    def read(self, world_size: int) -> dict[str, dict[str, float]]:
        """{modality: {"clusters_batch", "clusters_window", "samples_batch", "k"}} over all ranks."""
        mods = [m for m in self.count_keys if m in self.step and m in self.window]
        if not mods:
            return {}
        stacked = torch.stack([t for m in mods for t in (self.step[m], self.window[m])])
        if world_size > 1:
            dist.all_reduce(stacked)
        used = (stacked > 0).sum(-1).tolist()
        samples = stacked.sum(-1).tolist()
        self.window = {}
        k = stacked.shape[-1]
        return {m: {"clusters_batch": used[2 * i], "clusters_window": used[2 * i + 1],
                    "samples_batch": samples[2 * i], "k": k} for i, m in enumerate(mods)}


def model_flops_utilisation(images_per_s: float, flops_per_sample: float, peak_flops: float,
                            world_size: int) -> float:
    """MFU: achieved training FLOP/s over the peak of all devices."""
    return images_per_s * flops_per_sample / (peak_flops * world_size)


class RunningMean:
    def __init__(self):
        self.total, self.count = 0.0, 0

    def add(self, value: float) -> None:
        self.total, self.count = self.total + value, self.count + 1

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None


def _plain(x):
    try:
        return float(x)
    except (TypeError, ValueError):
        return str(x)


def fmt_summary(steps: int, samples: int, seconds: float, data_wait: float, mfu: float | None,
                checkpoints: int, nonfinite: int, final_loss: float | None) -> str:
    rate = samples / seconds if seconds > 0 else float("nan")
    parts = [f"done: {steps} steps", f"{samples} samples in {seconds:.1f}s", f"{rate:.1f} samples/s",
             f"data-wait {100 * data_wait:.1f}%",
             f"MFU {100 * mfu:.1f}%" if mfu is not None and math.isfinite(mfu) else "MFU n/a (CPU)",
             f"{checkpoints} checkpoints written", f"{nonfinite} non-finite steps skipped"]
    if final_loss is not None:
        parts.append(f"final loss {final_loss:.4f}")
    return " | ".join(parts)
