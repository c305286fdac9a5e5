"""Reading foreign weight files safely, and writing ours.

Every pickle is read with `torch.load(weights_only=True)`: tensors and plain containers only, so a
file cannot run code while it loads. The one class allowed beyond that is `argparse.Namespace`,
in which the SLIP reference keeps its training arguments. Exported weights are written as
safetensors (no pickle at all).
"""
from __future__ import annotations

import argparse
import json
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from pipeline.files import atomic_output, write_json_atomic
from trainer.convert.mapping import ConversionError

Tensor = torch.Tensor
_UNSUPPORTED = re.compile(r"GLOBAL ([\w.]+)")


def load_pickle(path: str | Path) -> Any:
    """A torch.save file, read without running code; a file that needs more than tensors,
    containers and argparse.Namespace is refused with a one-line ConversionError."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = _UNSUPPORTED.search(str(e))
        what = f"the class or function {found.group(1)}" if found else "objects beyond tensors and containers"
        raise ConversionError(f"{path}: refused to load: the pickle needs {what}, which could run arbitrary code "
                              "(allowed: tensors, plain containers, argparse.Namespace)") from None
    except Exception as e:   # truncated zip, not a torch file, ...
        raise ConversionError(f"{path}: unreadable ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") \
            from None


def load_safetensors(path: str | Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ConversionError(f"{path}: unreadable safetensors file ({e})") from None


def load_weights(path: str | Path) -> dict[str, Tensor]:
    """A state dict from a .safetensors file or a pickle holding one (bare, or under "state_dict"
    / "model" as training checkpoints keep it)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_safetensors(path)
    obj = load_pickle(path)
    if isinstance(obj, dict):
        for key in ("state_dict", "model"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, Tensor) for v in obj.values()):
        raise ConversionError(f"{path}: holds no state dict (a mapping of names to tensors)")
    return obj


def write_safetensors(state: dict[str, Tensor], path: Path) -> None:
    from safetensors.torch import save_file
    with atomic_output(path) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))


def write_json(data: dict, path: Path) -> None:
    write_json_atomic(path, data, indent=2)


def read_json(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConversionError(f"{path}: unreadable JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConversionError(f"{path}: expected a JSON object")
    return data
