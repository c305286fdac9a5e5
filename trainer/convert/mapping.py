"""Moving a state dict through a layout (trainer/convert/layout.py) with full accounting.

Into our layout, every source key is either mapped or matched by a drop rule (and reported with its
reason); a source key that is neither, a missing key, or a tensor whose shape does not fit our
model stops the conversion with a one-line `ConversionError` that names the key. Our expected
shapes come from the model built on the meta device (no memory, no initialisation).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from trainer.convert.layout import Pair
from trainer.models import ModelConfig, build_model

Tensor = torch.Tensor


class ConversionError(ValueError):
    """A checkpoint that cannot be converted exactly; the message is one line and names the cause."""


@dataclass
class Drop:
    """Source keys starting with `prefix` are left out on purpose, for `reason`."""
    prefix: str
    reason: str


@dataclass
class Mapped:
    state: dict[str, Tensor]
    dropped: list[str] = field(default_factory=list)     # "<prefix>* (<n> tensors): <reason>"


def expected_shapes(cfg: ModelConfig, objective: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of our model's state dict for (cfg, objective); the SimCLR head's norm is
    `cfg.ssl_norm` ("auto" counts as "ln")."""
    with torch.device("meta"):
        model = build_model(cfg, objective)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def to_ours(source: dict[str, Tensor], pairs: list[Pair], expected: dict[str, tuple[int, ...]],
            drops: list[Drop] = (), where: str = "checkpoint") -> Mapped:
    """Their state dict -> ours. `expected` is our model's state dict shapes, which `pairs` must cover."""
    ours_needed = set(expected)
    covered = {p.ours for p in pairs}
    if covered != ours_needed:   # a layout that does not describe the model: a bug here, not in the input
        missing = sorted(ours_needed - covered) or sorted(covered - ours_needed)
        raise ConversionError(f"{where}: no layout for our parameter {missing[0]}")
    state = {}
    for p in pairs:
        if p.theirs not in source:
            raise ConversionError(f"{where}: missing key {p.theirs} (our {p.ours})")
        t = p.form.to_ours(source[p.theirs])
        if tuple(t.shape) != expected[p.ours]:
            raise ConversionError(f"{where}: {p.theirs} has shape {tuple(source[p.theirs].shape)}, the model needs "
                                  f"{expected[p.ours]} for {p.ours} ({p.form.name})")
        state[p.ours] = t
    used = {p.theirs for p in pairs}
    dropped: dict[str, list[str]] = {}
    for key in source:
        if key in used:
            continue
        rule = next((d for d in drops if key.startswith(d.prefix)), None)
        if rule is None:
            raise ConversionError(f"{where}: unexpected key {key} (neither mapped nor known to be droppable)")
        dropped.setdefault(rule.prefix, []).append(key)
    reasons = {d.prefix: d.reason for d in drops}
    return Mapped(state, [f"{prefix}* ({len(keys)} tensors): {reasons[prefix]}" for prefix, keys in dropped.items()])


def to_theirs(state: dict[str, Tensor], pairs: list[Pair], where: str = "model") -> dict[str, Tensor]:
    """Our state dict -> theirs; every one of our keys must be in `pairs` or left out before the call."""
    by_ours = {p.ours: p for p in pairs}
    extra = sorted(set(state) - set(by_ours))
    if extra:
        raise ConversionError(f"{where}: no place for our parameter {extra[0]} in the target layout")
    out = {}
    for key, t in state.items():
        p = by_ours[key]
        out[p.theirs] = p.form.to_theirs(t.detach()).contiguous()
    missing = sorted(set(by_ours) - set(state))
    if missing:
        raise ConversionError(f"{where}: our checkpoint lacks {missing[0]}")
    return out


def strip_prefix(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    """Keys without a leading `prefix` (DistributedDataParallel's `module.`), where it is present."""
    return {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in state.items()}
