"""AdamW with the reference parameter groups, and the warmup + per-iteration cosine schedule.

No weight decay (SLIP reference): parameters with fewer than 2 dimensions (biases, norm scales,
logit scale, ...) and parameters whose name marks a bias or a LayerNorm/BatchNorm.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from trainer.config import OptimConfig


def no_weight_decay(name: str, param: torch.Tensor) -> bool:
    """ndim < 2, or a name token that marks a bias or a norm layer (ln_1, bn2, norm, ...)."""
    if param.ndim < 2:
        return True
    tokens = name.lower().replace("_", ".").split(".")
    return any(t == "bias" or t.startswith(("ln", "bn", "norm")) for t in tokens)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if no_weight_decay(name, p) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    groups = param_groups(model, cfg.weight_decay)
    on_gpu = any(p.is_cuda for g in groups for p in g["params"])
    # fused is the fastest AdamW on CUDA; foreach (multi-tensor) elsewhere.
    impl = {"fused": True} if on_gpu else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **impl)


class WarmupCosine:
    """Linear warmup from `start_lr` to `base_lr`, then cosine to `end_lr`, set every optimizer step.

    The learning rate is a pure function of the step, so the state is just the step: skipped
    (non-finite) steps still advance it and a resumed run gets the same rates as an unbroken one.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, base_lr: float, warmup_steps: int,
                 total_steps: int, start_lr: float = 1e-6, end_lr: float = 1e-5):
        self.optimizer = optimizer
        self.base_lr, self.start_lr, self.end_lr = base_lr, start_lr, end_lr
        self.warmup_steps, self.total_steps = max(0, warmup_steps), max(1, total_steps)
        self.step_count = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.start_lr + (self.base_lr - self.start_lr) * step / self.warmup_steps
        span = max(1, self.total_steps - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / span)
        return self.end_lr + 0.5 * (self.base_lr - self.end_lr) * (1 + math.cos(math.pi * progress))

    def _apply(self) -> None:
        lr = self.lr_at(self.step_count)
        for g in self.optimizer.param_groups:
            g["lr"] = lr

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def get_last_lr(self) -> float:
        return self.lr_at(self.step_count)

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "base_lr": self.base_lr, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "start_lr": self.start_lr, "end_lr": self.end_lr}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
