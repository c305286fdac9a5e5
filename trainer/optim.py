"""AdamW with the reference parameter groups, and the warmup + per-iteration cosine schedule.

No weight decay (SLIP reference): parameters with fewer than 2 dimensions (biases, norm scales,
logit scale, ...) and parameters whose name marks a bias or a LayerNorm/BatchNorm. Fine-tuning adds
name patterns to that list (`pos_embed`, `cls_token`) and layer-wise learning-rate decay (BEiT, MAE):
groups per layer carry an `lr_scale` that the schedule multiplies into their rate.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class OptimConfig:
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    epochs: float = 25
    warmup_epochs: float = 1
    warmup_start_lr: float = 1e-6
    min_lr: float = 1e-5
    # null: the rates above are used as they are; a number: they are rates for that global batch and
    # scale linearly with the run's (BEiT finetuning: 256)
    lr_reference_batch: int | None = None
    grad_clip: float | None = None     # max global grad norm; None = no clipping (norm still logged)
    accum_steps: int = 1               # micro-batches per optimizer step; negatives stay per micro-batch
    max_steps: int | None = None       # stop after this many steps (tests, benchmarks); the schedule
                                       # keeps `epochs`; null = the whole schedule

    def __post_init__(self):
        if self.accum_steps < 1:
            raise ValueError("accum_steps must be >= 1")
        positive = {"lr": self.lr, "eps": self.eps, "epochs": self.epochs}
        at_least_0 = {"weight_decay": self.weight_decay, "warmup_epochs": self.warmup_epochs,
                      "warmup_start_lr": self.warmup_start_lr, "min_lr": self.min_lr}
        for name, v in positive.items():
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be a number > 0, got {v}")
        for name, v in at_least_0.items():
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {v}")
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {list(self.betas)}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or null (no clipping), got {self.grad_clip}")
        if self.lr_reference_batch is not None and self.lr_reference_batch < 1:
            raise ValueError(f"lr_reference_batch must be >= 1 or null, got {self.lr_reference_batch}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"max_steps must be >= 1 or null (the whole schedule), got {self.max_steps}")


def no_weight_decay(name: str, param: torch.Tensor, extra: tuple[str, ...] = ()) -> bool:
    """ndim < 2, a name token that marks a bias or a norm layer (ln_1, bn2, norm, ...), or a name
    containing one of the `extra` patterns."""
    if param.ndim < 2:
        return True
    tokens = name.lower().replace("_", ".").split(".")
    if any(t == "bias" or t.startswith(("ln", "bn", "norm")) for t in tokens):
        return True
    return any(pattern in name for pattern in extra)


def param_groups(model: nn.Module, weight_decay: float, extra_no_decay: tuple[str, ...] = (),
                 layer_id: Callable[[str], int] | None = None, layer_decay: float = 1.0,
                 num_layers: int | None = None) -> list[dict]:
    """AdamW parameter groups; parameters keep their `named_parameters` order inside each group.

    Without `layer_id`: [decay, no_decay] (pretraining). With it: a decay and a no-decay group per
    layer id (ids 0 = embeddings .. num_layers + 1 = head; lowest id first, empty groups left out),
    each with lr_scale = layer_decay ** (num_layers + 1 - id), so the head trains at the full rate.
    """
    if layer_id is None:
        decay, no_decay = [], []
        for name, p in model.named_parameters():
            if p.requires_grad:
                (no_decay if no_weight_decay(name, p, extra_no_decay) else decay).append(p)
        return [{"params": decay, "weight_decay": weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]
    if num_layers is None:
        raise ValueError("layer-wise groups need num_layers")
    groups: dict[tuple[int, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            key = (layer_id(name), no_weight_decay(name, p, extra_no_decay))
            groups.setdefault(key, []).append(p)
    return [{"params": groups[key], "weight_decay": 0.0 if key[1] else weight_decay,
             "lr_scale": layer_decay ** (num_layers + 1 - key[0])}
            for key in sorted(groups)]


def vit_layer_id(name: str, num_layers: int) -> int:
    """Layer id of a SLIPModel image-trunk parameter for layer-wise decay: 0 for the stem (patch and
    position embeddings, CLS token, the LayerNorm before the blocks of OpenAI-style towers), i + 1 for
    block i, num_layers + 1 for the rest."""
    if name.startswith(("visual.patch_embed", "visual.pos_embed", "visual.cls_token", "visual.norm_pre")):
        return 0
    block = re.match(r"visual\.transformer\.blocks\.(\d+)\.", name)
    return int(block.group(1)) + 1 if block else num_layers + 1


def build_optimizer(model: nn.Module, cfg: OptimConfig, **group_options) -> torch.optim.AdamW:
    """AdamW over `param_groups(model, cfg.weight_decay, **group_options)`."""
    groups = param_groups(model, cfg.weight_decay, **group_options)
    on_gpu = any(p.is_cuda for g in groups for p in g["params"])
    # fused is the fastest AdamW on CUDA; foreach (multi-tensor) elsewhere.
    impl = {"fused": True} if on_gpu else {"foreach": True}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, **impl)


class WarmupCosine:
    """Linear warmup from `start_lr` to `base_lr`, then cosine to `end_lr`, set every optimizer step.

    Each group runs at the scheduled rate times its `lr_scale` (1 when absent). The rate is a pure
    function of the step, so the state is just the step: skipped (non-finite) steps still advance it
    and a resumed run gets the same rates as an unbroken one.
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

    @property
    def lr(self) -> float:
        """The scheduled rate of the current step (before the groups' `lr_scale`)."""
        return self.lr_at(self.step_count)

    def _apply(self) -> None:
        lr = self.lr
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)

    def step(self) -> None:
        self.step_count += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"step_count": self.step_count, "base_lr": self.base_lr, "warmup_steps": self.warmup_steps,
                "total_steps": self.total_steps, "start_lr": self.start_lr, "end_lr": self.end_lr}

    def load_state_dict(self, state: dict) -> None:
        self.step_count = int(state["step_count"])
        self._apply()
