"""Atomic, verified checkpoints: written to a temporary file, fsynced, renamed, directory fsynced.

A kill at any moment leaves either the old set of checkpoints or the old set plus the new one,
never a truncated file under a checkpoint name. Files are `<dir>/step_00001234.pt`; the latest is
the highest step. Everything stored is plain tensors / containers so loading works with
`weights_only=True` (no arbitrary unpickling).

Verification: torch's zip format stores a CRC-32 per record; `verify_checkpoint` checks every
record before any weight is used, on every load (`load_checkpoint`, `load_model`), so a damaged
file is an error naming the damaged record instead of silently wrong weights. A checkpoint is
never written from non-finite weights, and a new checkpoint is verified after writing, before the
older ones are pruned: pruning never removes the newest checkpoint that verifies. Temporary files
of killed writes are removed at the next save (and by the trainer at start).

`load_model` rebuilds a trained model from a checkpoint for inference (evaluation, finetuning).
"""
from __future__ import annotations

import errno
import os
import pickle
import random
import re
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from pipeline.regular_files import RefusedFile, is_regular, open_regular
from trainer.dataclass_io import ConfigError, from_dict
from trainer.models import IMAGE_SIDE, build_model

if TYPE_CHECKING:
    from trainer.config import RunConfig

_NAME = re.compile(r"^step_(\d{8,})\.pt$")
_TEMP_GLOB = ".step_*.pt.tmp*"     # temporary files of atomic_save


class CheckpointError(RuntimeError):
    pass


@dataclass
class CheckpointConfig:
    every_steps: int = 500             # also written at the end of the run and on a stop signal
    keep_every: int = 5000             # keep the latest plus every checkpoint whose step is a multiple
    resume: str = "auto"               # auto (latest in out_dir if any) | latest | none | a path

    def __post_init__(self):
        for name in ("every_steps", "keep_every"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0 (0 = never), got {getattr(self, name)}")
        if not self.resume:
            raise ValueError("resume must be auto, latest, none or a checkpoint path")


def checkpoint_path(ckpt_dir: str | Path, step: int) -> Path:
    return Path(ckpt_dir) / f"step_{step:08d}.pt"


def list_checkpoints(ckpt_dir: str | Path) -> list[tuple[int, Path]]:
    d = Path(ckpt_dir)
    if not d.is_dir():
        return []
    # regular files only: a FIFO named like a checkpoint would block whoever opens it
    found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _NAME.match(p.name)) and is_regular(p)]
    return sorted(found)


def latest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    found = list_checkpoints(ckpt_dir)
    return found[-1][1] if found else None


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _no_space(e: BaseException) -> bool:
    """Whether `e` (or an exception it was raised from or during) is a full disk: torch's writer
    reports it as "unexpected pos" with the OSError only in the exception chain."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno == errno.ENOSPC or "No space left on device" in str(e):
            return True
        e = e.__cause__ or e.__context__
    return False


def atomic_save(obj: Any, path: str | Path) -> None:
    """torch.save `obj` to `path` atomically; a full disk is a one-line CheckpointError saying where."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except Exception as e:
        if _no_space(e):
            raise CheckpointError(f"{path}: No space left on device in {path.parent} while writing this "
                                  "checkpoint; the earlier checkpoints are kept: free space there and rerun "
                                  "the same command to resume") from e
        raise
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()
    _fsync_dir(path.parent)


def remove_stale_temps(ckpt_dir: str | Path, keep_pid: int | None = None) -> list[Path]:
    """Remove the temporary files of interrupted writes (all, or all but `keep_pid`'s); the removed."""
    removed = []
    for stale in Path(ckpt_dir).glob(_TEMP_GLOB):
        if keep_pid is None or not stale.name.endswith(f"tmp{keep_pid}"):
            stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def weights_finite(weights: dict) -> bool:
    """Whether every floating-point tensor of a state dict is finite (one device sync)."""
    by_device: dict[torch.device, list[torch.Tensor]] = {}
    for v in weights.values():
        if torch.is_tensor(v) and v.is_floating_point() and v.numel():
            by_device.setdefault(v.device, []).append(torch.isfinite(v).all())
    return all(bool(torch.stack(checks).all()) for checks in by_device.values())


def verify_checkpoint(path: str | Path) -> None:
    """Raise a one-line CheckpointError unless `path` is a complete zip-format torch checkpoint whose
    every record matches its stored CRC-32 (`zipfile.testzip`: reads the file once)."""
    path = Path(path)
    try:
        with os.fdopen(open_regular(path, "a checkpoint"), "rb") as f, zipfile.ZipFile(f) as z:
            bad = z.testzip()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except RefusedFile as e:
        raise CheckpointError(str(e)) from None
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, NotImplementedError) as e:
        raise CheckpointError(f"{path}: unreadable checkpoint (not a complete zip-format torch.save file: "
                              f"{e})") from None
    if bad is not None:
        raise CheckpointError(f"{path}: damaged checkpoint (record {bad} fails its CRC-32 check)")


def save_checkpoint(state: dict, ckpt_dir: str | Path, step: int, keep_every: int = 0) -> Path:
    """Write `state` for `step`, verify it, then prune older checkpoints except multiples of
    `keep_every`. Non-finite weights in `state["model"]` are refused (nothing is written)."""
    path = checkpoint_path(ckpt_dir, step)
    if not weights_finite(state.get("model", {})):
        raise CheckpointError(f"{path}: the weights at step {step} are not finite; checkpoint not written")
    atomic_save(to_safe(state), path)
    try:
        verify_checkpoint(path)
    except CheckpointError as e:
        path.unlink(missing_ok=True)
        raise CheckpointError(f"{e} right after writing it (removed; the earlier checkpoints are kept): "
                              "check the storage") from None
    for old_step, old in list_checkpoints(ckpt_dir):
        if old_step < step and not (keep_every > 0 and old_step % keep_every == 0):
            old.unlink(missing_ok=True)
    remove_stale_temps(ckpt_dir, keep_pid=os.getpid())
    return path


def load_checkpoint(path: str | Path, verify: bool = True) -> dict:
    """The checkpoint's state, verified first (`verify=False` only where the same file was verified
    just before, e.g. by rank 0)."""
    path = Path(path)
    if verify:
        verify_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such checkpoint") from None
    except pickle.UnpicklingError as e:   # torch's own message advises weights_only=False: never do that
        found = re.search(r"GLOBAL ([\w.]+)", str(e))
        what = f"the class or function {found.group(1)}" if found else "objects beyond tensors and containers"
        raise CheckpointError(f"{path}: refused to load: it needs {what}, which could run arbitrary code; "
                              "only tensors and plain containers are loaded") from None
    except Exception as e:  # truncated zip, foreign pickle, ...
        raise CheckpointError(f"{path}: unreadable checkpoint ({type(e).__name__}: {e})") from e


def to_safe(obj: Any) -> Any:
    """Convert numpy values (loader/RNG state) into types that `weights_only` loading accepts."""
    if isinstance(obj, dict):
        return {k: to_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        out = [to_safe(v) for v in obj]
        return tuple(out) if isinstance(obj, tuple) else out
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def check_model_state(model: nn.Module, state: dict[str, torch.Tensor], source: str,
                      ignore: tuple[str, ...] = ()) -> None:
    """Raise a CheckpointError listing missing/unexpected keys and shape mismatches; keys starting
    with a prefix in `ignore` are left out of the comparison."""
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(ignore)}
    state = {k: v for k, v in state.items() if not k.startswith(ignore)}
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        lines = [f"{source}: checkpoint does not match the model (different model config?)"]
        if shapes:
            lines.append("  shape mismatches:\n    " + "\n    ".join(shapes[:20]))
        if missing:
            lines.append(f"  missing in checkpoint ({len(missing)}): {', '.join(missing[:10])}")
        if unexpected:
            lines.append(f"  not in model ({len(unexpected)}): {', '.join(unexpected[:10])}")
        raise CheckpointError("\n".join(lines))


# ---------------------------------------------------------------- model for inference

# The SimCLR projection head serves only the training loss, and its norm layer follows the training
# batch size and world size (ssl_norm="auto"), which a reader of the checkpoint may not reproduce:
# it is neither checked nor loaded.
TRAINING_ONLY = ("ssl_head.",)


def _strip_prefixes(state: dict) -> dict:
    """Parameter names without the wrappers' prefixes (DistributedDataParallel, torch.compile)."""
    out = {}
    for k, v in state.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix):]
        out[k] = v
    return out


def _run_config(path: Path, state: dict, config: str | Path | None) -> RunConfig:
    """`config` if given, else the configuration stored in the checkpoint, else the `config.yaml`
    the trainer writes in the run directory (checkpoints live in `<run dir>/checkpoints/`)."""
    # imported here: trainer.config imports the loop, which imports this module
    from trainer.config import RunConfig, check_consistency, load_config
    if config is not None:
        return load_config(config)
    if isinstance(state.get("config"), dict):
        try:
            cfg = from_dict(RunConfig, state["config"])
            check_consistency(cfg)
        except ConfigError as e:
            raise ConfigError(f"{path}: stored run configuration: {e}") from None
        return cfg
    for cand in (path.parent.parent / "config.yaml", path.parent / "config.yaml"):
        if cand.is_file():
            return load_config(cand)
    raise FileNotFoundError(f"{path}: no run configuration in the checkpoint and no config.yaml in the run "
                            "directory; pass one")


def load_model(path: str | Path, config: str | Path | None = None,
               device: str | torch.device = "cpu", text_only: bool = False) -> tuple[nn.Module, RunConfig]:
    """(model, run_config) of a checkpoint: the run's model with the checkpoint's weights, on `device`,
    in eval mode. The run configuration is `config` (a YAML path) if given, else the one stored in the
    checkpoint, else `<run dir>/config.yaml`. A checkpoint of another architecture, a damaged file (CRC-32)
    or non-finite weights are a CheckpointError. `text_only`: the text side alone (textual evaluation);
    the image side's tensors are dropped as the file is read, never built into the model."""
    path = Path(path)
    state = load_checkpoint(path)
    run_cfg = _run_config(path, state, config)
    model = build_model(run_cfg.model, run_cfg.objective.name, text_only=text_only)
    skip = TRAINING_ONLY + (IMAGE_SIDE if model.text_only else ())
    weights = {k: v for k, v in _strip_prefixes(state.get("model", state)).items() if not k.startswith(skip)}
    del state
    check_model_state(model, weights, str(path), ignore=skip)
    if not weights_finite(weights):
        raise CheckpointError(f"{path}: the checkpoint's weights are not finite (NaN or inf); use an earlier one")
    model.load_state_dict(weights, strict=False)   # the skipped keys: checked above, strictly
    return model.to(device).eval(), run_cfg


# ---------------------------------------------------------------- RNG state

def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "gauss": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
