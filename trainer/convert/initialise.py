"""Initialising a new run's model from a checkpoint: weights only (`model.init_from=PATH`).

The checkpoint may be ours (a run's or a converted one), a SLIP-reference file, an OpenCLIP folder
or weights file, or a timm folder. Its towers must be the run's (`model.*` equal in every field the
weights do not show: head counts, activations, LayerNorm options), else the run stops with the
differences. Parts are loaded whole or not at all: the image tower always; the text tower,
projections and logit scale when both sides have them; the SimCLR and nCLIP heads when they fit
exactly (a BatchNorm head does not fit a LayerNorm one), else they keep their initialisation. The
optimizer, the schedule and the data position start fresh.
"""
from __future__ import annotations

import zipfile
from pathlib import Path

import torch

from pipeline.regular_files import is_regular
from trainer.checkpoint import CheckpointError, verify_checkpoint, weights_finite
from trainer.convert.converted import Converted, tower_differences
from trainer.convert.files import load_pickle, load_safetensors
from trainer.convert.mapping import ConversionError, strip_prefix
from trainer.convert.openclip import CONFIG_NAME, model_cfg, read_openclip
from trainer.convert.slip_reference import read_slip_reference
from trainer.convert.timm import ImageTower, read_timm
from trainer.models import ModelConfig
from trainer.objectives import objective_parts

# (what a report calls it, our parameter prefixes, whether a misfit stops the run)
PARTS = [("image tower", ("visual.",), True), ("text tower", ("text.",), True),
         ("projections and logit scale", ("image_projection", "text_projection", "logit_scale"), True),
         ("SimCLR head", ("ssl_head.",), False),
         ("nCLIP heads", ("image_cluster_head.", "text_cluster_head.", "prototypes."), False)]


def _ours(path: Path, ckpt: dict) -> Converted:
    """One of our checkpoints (its run configuration stored inside, or config.yaml beside it)."""
    from trainer.config import RunConfig, from_dict, load_config
    if isinstance(ckpt.get("config"), dict):
        run_cfg = from_dict(RunConfig, ckpt["config"])
    else:
        found = [c for c in (path.parent.parent / "config.yaml", path.parent / "config.yaml") if c.is_file()]
        if not found:
            raise ConversionError(f"{path}: no run configuration in the checkpoint and no config.yaml beside it")
        run_cfg = load_config(found[0])
    state = strip_prefix(strip_prefix(ckpt["model"], "module."), "_orig_mod.")
    if not weights_finite(state):
        raise ConversionError(f"{path}: the checkpoint's weights are not finite (NaN or inf); use an earlier one")
    recipe = run_cfg.data.recipe
    return Converted(run_cfg.model, run_cfg.objective.name, state, tuple(recipe.mean), tuple(recipe.std),
                     f"checkpoint: {path}")


def read_any(path: str | Path, run_model: ModelConfig) -> Converted | ImageTower:
    """Whatever `path` holds, in our terms. A bare OpenCLIP weights file does not say its
    architecture: the run's model (which it must match) supplies it."""
    path = Path(path)
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            return read_openclip(path)
        if (path / "config.json").is_file():
            return read_timm(path)
        raise ConversionError(f"{path}: a folder without {CONFIG_NAME} (OpenCLIP) or config.json (timm)")
    if path.suffix != ".safetensors" and is_regular(path) and zipfile.is_zipfile(path):
        try:                     # the CRC of every record, before any weight is used
            verify_checkpoint(path)
        except CheckpointError as e:
            raise ConversionError(str(e)) from None
    obj = load_safetensors(path) if path.suffix == ".safetensors" else load_pickle(path)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict) and ("config" in obj or "step" in obj):
        return _ours(path, obj)
    inner = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
    keys = set(strip_prefix(inner, "module.")) if isinstance(inner, dict) else set()
    if "visual.cls_token" in keys:
        return read_slip_reference(path)
    if {"visual.conv1.weight", "visual.trunk.cls_token"} & keys:
        return read_openclip(path, mcfg=model_cfg(run_model)[0])
    raise ConversionError(f"{path}: not a checkpoint we read (ours, SLIP reference, OpenCLIP, timm)")


def init_from(model: torch.nn.Module, path: str | Path, run_cfg=None) -> list[str]:
    """Copy a checkpoint's weights into `model` (a fresh SLIPModel, before DDP / compile); returns
    report lines. With `run_cfg`, a preprocessing mismatch (mean / std) is reported too."""
    src = read_any(path, model.cfg)
    src_text = isinstance(src, Converted) and objective_parts(src.objective).text
    diffs = tower_differences(src.model, model.cfg, text=src_text and model.uses_text)
    if diffs:
        listed = "; ".join(f"model.{n}: checkpoint {theirs!r}, run {ours!r}" for n, theirs, ours in diffs)
        raise ConversionError(f"{path}: the run's model differs from the checkpoint's ({listed}); "
                              "set these to the checkpoint's")
    target = model.state_dict()
    loaded, lines = {}, [f"initialised from {src.source}"]
    for label, prefixes, required in PARTS:
        want = {k: v for k, v in target.items() if k.startswith(prefixes)}
        have = {k: v for k, v in src.state.items() if k.startswith(prefixes)}
        if not want and have:
            lines.append(f"not used: the checkpoint's {label} (this run's model has none)")
        elif want and not have:
            lines.append(f"kept at initialisation: {label} (the checkpoint has none)")
        elif want:
            misfit = sorted(set(want) ^ set(have)) or [k for k in want if want[k].shape != have[k].shape]
            if not misfit:
                loaded.update(have)
                lines.append(f"loaded: {label} ({len(have)} tensors)")
            elif required:
                raise ConversionError(f"{path}: the checkpoint's {label} does not fit this run's model "
                                      f"(at {misfit[0]})")
            else:
                lines.append(f"kept at initialisation: {label} (the checkpoint's does not fit, at {misfit[0]})")
    model.load_state_dict(loaded, strict=False)
    if run_cfg is not None:
        recipe = run_cfg.data.recipe
        if (tuple(recipe.mean), tuple(recipe.std)) != (tuple(src.mean), tuple(src.std)):
            lines.append(f"warning: the checkpoint's images were normalised with mean {list(src.mean)}, std "
                         f"{list(src.std)}; this run uses {list(recipe.mean)}, {list(recipe.std)} "
                         "(set data.recipe.mean / data.recipe.std to keep them)")
    return lines
