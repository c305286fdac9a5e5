"""The one typed run configuration: a dataclass tree read from YAML plus `key.sub=value` overrides.

Every value is type-checked against the dataclass annotations; an unknown key or a wrong type is an
error naming the YAML file and line (or the override) instead of a silently ignored setting. The
resolved configuration is written to `<out_dir>/config.yaml`, so every run records exactly what ran.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.recipe import AugmentationRecipe
from trainer.evaluation.config import EvalConfig
from trainer.models import ModelConfig
from trainer.objectives import ObjectiveConfig


@dataclass
class DataConfig:
    manifest: str = ""                 # result manifest json of a shard build (pipeline/manifest.py)
    batch_size: int = 64               # per rank and per micro-batch
    num_threads: int = 4               # DALI CPU threads per rank
    device: Literal["auto", "cpu", "gpu"] = "auto"   # where DALI augments; auto = gpu when CUDA is up
    # what augments: the DALI graph (CPU or GPU) or pillow-simd (CPU only: the faster CPU path,
    # tools/bench/bench_pipeline.py; its batches are copied to the GPU by the trainer)
    backend: Literal["dali", "pillow"] = "dali"
    caption_mode: str = "random"       # title or description picked at random, as the reference
    recipe: AugmentationRecipe = field(default_factory=AugmentationRecipe)


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
    grad_clip: float | None = None     # max global grad norm; None = no clipping (norm still logged)
    accum_steps: int = 1               # micro-batches per optimizer step; negatives stay per micro-batch
    max_steps: int | None = None       # stop early (tests, benchmarks); the schedule keeps `epochs`


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


@dataclass
class CheckpointConfig:
    every_steps: int = 500             # also written at the end of every epoch and of the run
    keep_every: int = 5000             # keep the latest plus every checkpoint whose step is a multiple
    resume: str = "auto"               # auto (latest in out_dir if any) | latest | none | a path


@dataclass
class DebugConfig:
    inject_nan_at_steps: list[int] = field(default_factory=list)  # loss forced to NaN at these steps
    sigkill_at_step: int | None = None     # SIGKILL self after this step (resume tests)
    save_rank_params: bool = False          # each rank writes its final parameters (sync tests)


@dataclass
class RunConfig:
    out_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


class ConfigError(ValueError):
    pass


# ---------------------------------------------------------------- dict <-> dataclass with checking

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against annotation `tp`; return it converted (lists -> tuples, int -> float)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: expected one of {list(args)}, got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, where)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        elem = args[0] if args else Any
        items = [_coerce(v, elem, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass `cls` from a (partial) mapping; missing keys keep their defaults."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls) if f.init]
    kwargs = {}
    if "preset" in data and hasattr(cls, "preset"):
        # `model: {preset: vit_b16, ...}` starts from the named preset, then applies the other keys
        data = dict(data)
        try:
            base = to_dict(cls.preset(data.pop("preset")))
        except ValueError as e:
            raise ConfigError(f"{where}.preset: {e}") from None
        data = {**base, **data}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(names)})"
            raise ConfigError(f"{path}: unknown key{hint}")
        kwargs[key] = _coerce(value, hints[key], path)
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:  # the dataclass's own validation (__post_init__)
        raise ConfigError(f"{where or cls.__name__}: {e}") from None


def to_dict(cfg: Any) -> Any:
    """Dataclass tree -> plain YAML-safe data (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


# ---------------------------------------------------------------- YAML and overrides

def _key_lines(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    """Map dotted key paths to 1-based YAML line numbers, for error messages."""
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            path = f"{prefix}.{k.value}" if prefix else str(k.value)
            lines[path] = k.start_mark.line + 1
            lines.update(_key_lines(v, path))
    return lines


def _set_dotted(d: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
        if not isinstance(d, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    d[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`optim.lr=1e-3` -> ("optim.lr", 0.001); values parse as YAML (numbers, bools, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r}: expected key.sub=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: {e}") from e
    value = _float_strings(value)  # YAML 1.1 reads 1e-3 as a string
    return key.strip(), value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """YAML file (optional) + overrides -> checked RunConfig. Errors name the file and line."""
    data: dict = {}
    lines: dict[str, int] = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text()
            data = yaml.safe_load(text) or {}
            lines = _key_lines(yaml.compose(text) or yaml.MappingNode("", []))
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config ({e})") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
        data = _float_strings(data)
    try:
        from_dict(RunConfig, data)
    except ConfigError as e:
        key = str(e).split(":", 1)[0].split("[", 1)[0]
        while key and key not in lines:
            key = key.rpartition(".")[0]
        raise ConfigError(f"{path}:{lines.get(key, '?')}: {e}") from None
    for ov in overrides:
        key, value = parse_override(ov)
        _set_dotted(data, key, value)
        try:
            from_dict(RunConfig, data)
        except ConfigError as e:
            raise ConfigError(f"override {ov!r}: {e}") from None
    cfg = from_dict(RunConfig, data)
    check_consistency(cfg)
    return cfg


def _float_strings(obj: Any) -> Any:
    """PyYAML (YAML 1.1) leaves `1e-3` as a string; turn such scalars into floats."""
    if isinstance(obj, dict):
        return {k: _float_strings(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_float_strings(v) for v in obj]
    if isinstance(obj, str):
        try:
            if any(c in obj.lower() for c in "e.") and obj[:1] in tuple("+-.0123456789"):
                return float(obj)
        except ValueError:
            pass
    return obj


def save_config(cfg: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))


def check_consistency(cfg: RunConfig) -> None:
    """Cross-section rules the per-field types cannot express."""
    if cfg.data.recipe.image_size != cfg.model.image_size:
        raise ConfigError(f"data.recipe.image_size={cfg.data.recipe.image_size} differs from "
                          f"model.image_size={cfg.model.image_size}")
    if cfg.objective.name in ("simclr", "slip") and cfg.data.recipe.num_ssl_views != 2:
        raise ConfigError(f"objective {cfg.objective.name} needs data.recipe.num_ssl_views=2")
    if cfg.data.backend == "pillow" and cfg.data.device == "gpu":
        raise ConfigError("data.backend=pillow augments on the CPU: set data.device to cpu or auto")
    if cfg.optim.accum_steps < 1 or cfg.data.batch_size < 1:
        raise ConfigError("data.batch_size and optim.accum_steps must be >= 1")
    if cfg.train.log_every < 1:
        raise ConfigError("train.log_every must be >= 1")
