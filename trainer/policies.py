"""Small decisions the training loop asks about each step: cadences, the non-finite policy, stop
signals, and the debug faults the tests inject."""
from __future__ import annotations

import math
import os
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch


class NonFiniteLossError(RuntimeError):
    pass


@dataclass(frozen=True)
class Every:
    """Due at every multiple of `n` steps; never when `n` is 0."""
    n: int

    def __call__(self, step: int) -> bool:
        return bool(self.n) and step % self.n == 0


def last_good_text(last_good: str | Path | None) -> str:
    if last_good is None:
        return "No checkpoint was written or resumed from"
    return f"The last good checkpoint is {last_good}"


@dataclass(frozen=True)
class NonFinitePolicy:
    """Skip a step whose loss or gradient is not finite; stop after `max_in_a_row` such steps in a
    row (the count survives a resume: it is part of the checkpoint)."""
    max_in_a_row: int

    def check(self, in_a_row: int, step: int, last_good: str | Path | None) -> None:
        """`last_good`: the newest checkpoint known to be good (written or resumed from), or None."""
        if in_a_row >= self.max_in_a_row:
            raise NonFiniteLossError(
                f"{in_a_row} non-finite steps in a row (last at step {step}); "
                f"stopping. {last_good_text(last_good)} "
                "(lower the lr, enable optim.grad_clip, or check the data).")


@dataclass
class _OncePerFall:
    """The memory both nCLIP watches share: one warning per modality per fall. A fresh tower maps every
    input alike, so a run usually starts below the bars; warning once per run would spend the warning
    there and stay quiet through a later collapse. So a modality re-arms once its value has recovered
    to REARM times the bar, and a value hovering around the bar does not repeat the warning."""
    REARM = 2.0
    warned: set[str] = field(default_factory=set, kw_only=True)

    def _newly(self, mod: str, value: float, bar: float) -> bool:
        if not bar:
            return False
        if value >= self.REARM * bar:
            self.warned.discard(mod)
        if value >= bar or mod in self.warned:
            return False
        self.warned.add(mod)
        return True


@dataclass
class CollapseWatch(_OncePerFall):
    """Warns (once per fall, per modality) when nCLIP's clusters used in a global batch fall below
    `min_fraction` of min(K, global batch): with K above the batch no batch can use more than the
    batch size, so a fraction of K alone would mean nothing. 0 turns it off."""
    min_fraction: float

    def check(self, usage: dict[str, dict[str, float]]) -> list[tuple[str, str, float]]:
        """(modality, message, fraction) for each modality that newly falls below the threshold."""
        found = []
        for mod, u in usage.items():
            bound = min(u["k"], u["samples_batch"])
            fraction = u["clusters_batch"] / bound if bound else 1.0
            if self._newly(mod, fraction, self.min_fraction):
                found.append((mod, f"nCLIP {mod} clusters are collapsing: {int(u['clusters_batch'])} used in a "
                                   f"global batch of {int(u['samples_batch'])} (K = {int(u['k'])}), "
                                   f"{100 * fraction:.1f}% of min(K, batch) < {100 * self.min_fraction:.0f}% "
                                   "(objective.nclip_min_usage; see docs/NCLIP.md)", fraction))
        return found


@dataclass
class UniformWatch(_OncePerFall):
    """Warns (once per fall, per modality) when nCLIP's outputs go near-uniform: the mean per-sample KL(p || uniform)
    = ln K - (mean per-sample entropy) below `min_kl` nats. That is the other way nCLIP collapses:
    every sample spread almost evenly over all K clusters, so the clusters carry nothing while the
    argmax of the nearly equal logits still lands all over the batch and the usage watch stays quiet.
    Freshly initialised heads sit well above the bar (cosine logits over the student temperature:
    about 1 / (2 d tau^2) nats for a d-dim bottleneck). 0 turns it off."""
    min_kl: float

    def check(self, sample_entropy: dict[str, float], k: dict[str, int]) -> list[tuple[str, str, float]]:
        """(modality, message, KL in nats) for each modality that newly falls below the bar."""
        found = []
        for mod, h in sample_entropy.items():
            kl = math.log(k[mod]) - h
            if self._newly(mod, kl, self.min_kl):
                found.append((mod, f"nCLIP {mod} outputs are near-uniform: mean per-sample entropy {h:.4f} nats, "
                                   f"{kl:.4f} below ln K = {math.log(k[mod]):.4f} (K = {k[mod]}), under "
                                   f"objective.nclip_min_kl = {self.min_kl:g}: every sample is spread almost evenly "
                                   "over all clusters, so the cluster counts are argmax noise (see docs/NCLIP.md)", kl))
        return found


class StopSignals:
    """Records SIGTERM / SIGUSR1 (SLURM preemption, scancel): the run checkpoints at the end of the
    step and exits. The handler runs only between Python operations: a rank blocked in a collective
    whose peer is dead sees it when the collective fails, after at most `dist.timeout_s`. A second
    signal takes the default action at once (torchrun's agent, or a user, insisting)."""

    def __init__(self):
        self.received: int | None = None

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received is not None:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        self.received = signum

    @property
    def requested(self) -> bool:
        return self.received is not None


@dataclass
class DebugConfig:
    inject_nan_at_steps: list[int] = field(default_factory=list)  # loss forced to NaN at these steps
    sigkill_at_step: int | None = None     # SIGKILL self after this step (resume tests)
    sigkill_rank: int | None = None        # only this rank (None: every rank); under torchrun first attempt only
    save_rank_params: bool = False          # each rank writes its final parameters (sync tests)
    save_cluster_counts: bool = False       # each rank writes its own nCLIP histograms of every log step (monitoring tests)


class NaNLossAtSteps:
    """Wraps an objective: its loss becomes NaN on the given (1-based) optimizer steps, so the
    non-finite policy can be tested end to end. `current_step()` names the step being taken."""

    def __init__(self, objective: Callable[[dict], dict], steps: list[int], current_step: Callable[[], int]):
        self.objective, self.steps, self.current_step = objective, set(steps), current_step

    def __call__(self, out: dict) -> dict:
        losses = self.objective(out)
        if self.current_step() in self.steps:
            losses = {**losses, "loss": losses["loss"] * float("nan")}
        return losses


class DebugFaults:
    """The faults and dumps of `DebugConfig`, at the points of the loop where they apply."""

    def __init__(self, cfg: DebugConfig, out_dir: str | Path, rank: int):
        self.cfg, self.out_dir, self.rank = cfg, Path(out_dir), rank
        self.cluster_counts: dict[int, dict] = {}

    def wrap_objective(self, objective: Callable[[dict], dict], current_step: Callable[[], int]):
        if not self.cfg.inject_nan_at_steps:
            return objective
        return NaNLossAtSteps(objective, self.cfg.inject_nan_at_steps, current_step)

    def after_step(self, step: int) -> None:
        if self.cfg.sigkill_at_step is None or step != self.cfg.sigkill_at_step:
            return
        if self.cfg.sigkill_rank is not None and self.cfg.sigkill_rank != self.rank:
            return
        if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
            return     # the elastic agent restarted the group: the fault has happened once
        os.kill(os.getpid(), signal.SIGKILL)

    def before_usage_read(self, step: int, step_counts: dict, window_counts: dict) -> None:
        """This rank's histograms (step, window) before they are summed over ranks."""
        if self.cfg.save_cluster_counts:
            self.cluster_counts[step] = {m: (step_counts[m].cpu().clone(), window_counts[m].cpu().clone())
                                         for m in step_counts if m in window_counts}

    def after_fit(self, model: torch.nn.Module) -> None:
        if self.cfg.save_rank_params:
            torch.save(model.state_dict(), self.out_dir / f"rank{self.rank}_params.pt")
        if self.cfg.save_cluster_counts:
            torch.save(self.cluster_counts, self.out_dir / f"rank{self.rank}_cluster_counts.pt")
