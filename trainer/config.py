"""The one typed run configuration: a dataclass tree read from YAML plus `key.sub=value` overrides.

Each component owns its section's dataclass (models, objectives, the data with its augmentation
recipe, the optimizer, the loop, checkpoints, evaluation, the debug faults, the process-group
timeouts); this module assembles them into `RunConfig` and checks the rules that span sections.
Every value is type-checked against the dataclass annotations (trainer/dataclass_io.py); an unknown key or a wrong
type is an error naming the YAML file and line (or the override) instead of a silently ignored
setting. Values a type cannot rule out are checked too (`check_values`): no number is NaN or
infinite, seeds are non-negative, crop scales are ordered fractions. The resolved configuration
is written to `<out_dir>/config.yaml` once the run's resume is settled (trainer/resume.py), so
every run records exactly what ran.

Configs are copied from issues and mails, so YAML is read with a safe loader that also refuses
anchors and aliases (`&a`, `*a`, `<<: *a`): a config needs none, and a few hundred bytes of nested
aliases expand to billions of nodes. A config file must be a regular file of at most
`MAX_CONFIG_BYTES`.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline.augment import check_backend
from pipeline.files import atomic_output
from pipeline.regular_files import RefusedFile, read_regular
from trainer.batches import DataConfig
from trainer.checkpoint import CheckpointConfig
from trainer.dataclass_io import ConfigError, from_dict, to_dict
from trainer.distributed import DistConfig
from trainer.evaluation.config import EvalConfig
from trainer.finetune import FinetuneConfig, is_finetuning
from trainer.loop import TrainConfig
from trainer.models import ModelConfig
from trainer.objectives import ObjectiveConfig, objective_parts
from trainer.optim import OptimConfig
from trainer.policies import DebugConfig

__all__ = ["CheckpointConfig", "ConfigError", "DataConfig", "DebugConfig", "DistConfig", "EvalConfig",
           "ModelConfig", "ObjectiveConfig", "OptimConfig", "RunConfig", "TrainConfig", "check_consistency",
           "check_values", "from_dict", "load_config", "parse_override", "safe_yaml", "save_config", "to_dict"]

MAX_CONFIG_BYTES = 1 << 20       # a run config is a few kB


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
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)   # used when objective.name=classification
    dist: DistConfig = field(default_factory=DistConfig)


# ---------------------------------------------------------------- YAML and overrides

class _NoAliasLoader(yaml.SafeLoader):
    """PyYAML's safe loader, refusing anchors and aliases before any node is built from them."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise _AliasRefused(event.start_mark.line + 1)
        return super().compose_node(parent, index)


class _AliasRefused(yaml.YAMLError):
    def __init__(self, line: int):
        super().__init__(f"line {line}: YAML anchors and aliases (&name, *name) are not allowed in a config")
        self.line = line


def safe_yaml(text: str, compose: bool = False):
    """`text` parsed as YAML (or, with `compose`, its node tree), safe types only and no anchors or
    aliases; yaml.YAMLError otherwise."""
    loader = _NoAliasLoader(text)
    try:
        return loader.get_single_node() if compose else loader.get_single_data()
    finally:
        loader.dispose()


def _key_lines(node: yaml.Node, prefix: str = "") -> dict[str, int]:
    """Map dotted key paths to 1-based YAML line numbers, for error messages."""
    lines = {}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            path = f"{prefix}.{k.value}" if prefix else str(k.value)
            lines[path] = k.start_mark.line + 1
            lines.update(_key_lines(v, path))
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            lines[f"{prefix}[{i}]"] = v.start_mark.line + 1
            lines.update(_key_lines(v, f"{prefix}[{i}]"))
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
        value = safe_yaml(raw) if raw.strip() else ""
    except _AliasRefused:
        raise ConfigError(f"override {text!r}: YAML anchors and aliases are not allowed") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {text!r}: {e}") from e
    value = _float_strings(value)  # YAML 1.1 reads 1e-3 as a string
    return key.strip(), value


def read_yaml_file(path: str | Path, what: str, max_bytes: int = MAX_CONFIG_BYTES) -> tuple[dict, dict[str, int]]:
    """A YAML config file's top-level mapping (numbers like 1e-3 as floats) and the line of each
    dotted key path (list items as `key[i]`), for error messages; one-line ConfigErrors otherwise."""
    path = Path(path)
    try:
        text = read_regular(path, max_bytes, what).decode("utf-8")
        data = safe_yaml(text) or {}
        lines = _key_lines(safe_yaml(text, compose=True) or yaml.MappingNode("", []))
    except RefusedFile as e:
        raise ConfigError(str(e)) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read config ({e})") from e
    except _AliasRefused as e:
        raise ConfigError(f"{path}:{e.line}: YAML anchors and aliases (&name, *name) are not allowed "
                          "in a config") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    return _float_strings(data), lines


def error_line(e: ConfigError, lines: dict[str, int]) -> int | str:
    """The YAML line of the key a ConfigError names (its closest enclosing key), '?' if unknown."""
    key = str(e).split(":", 1)[0]
    while key and key not in lines:
        key = key.rpartition(".")[0] if "." in key.rpartition("[")[2] or "[" not in key \
            else key.rpartition("[")[0]
    return lines.get(key, "?")


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """YAML file (optional) + overrides -> checked RunConfig. Errors name the file and line."""
    data: dict = {}
    lines: dict[str, int] = {}
    if path is not None:
        data, lines = read_yaml_file(path, "a run config")
    try:
        from_dict(RunConfig, data)
    except ConfigError as e:
        raise ConfigError(f"{path}:{error_line(e, lines)}: {e}") from None
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


def save_config(cfg: RunConfig, path: str | Path, header: str = "") -> None:
    """Written atomically: a reader sees the previous file or the complete new one. `header`:
    comment lines put first (the trainer records each data source's checksum there)."""
    with atomic_output(path) as tmp:
        tmp.write_text(header + yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _non_finite(cfg: Any, where: str = "") -> tuple[str, float] | None:
    """(key, value) of the first NaN or infinite number in a dataclass tree, or None."""
    if dataclasses.is_dataclass(cfg):
        for f in dataclasses.fields(cfg):
            found = _non_finite(getattr(cfg, f.name), f"{where}.{f.name}" if where else f.name)
            if found:
                return found
    elif isinstance(cfg, (list, tuple)):
        for i, v in enumerate(cfg):
            if found := _non_finite(v, f"{where}[{i}]"):
                return found
    elif isinstance(cfg, float) and not math.isfinite(cfg):
        return where, cfg
    return None


def check_values(cfg: RunConfig) -> None:
    """Values no annotation rules out, each a one-line ConfigError naming its key."""
    if found := _non_finite(cfg):
        raise ConfigError(f"{found[0]} must be a finite number, got {found[1]}")
    if not 0 <= cfg.train.seed < 2 ** 63:
        raise ConfigError(f"train.seed must be an integer in [0, 2**63), got {cfg.train.seed}")
    recipe = cfg.data.recipe
    for name in ("clip_scale", "ssl_scale"):
        low, high = getattr(recipe, name)
        if not 0 < low <= high <= 1:
            raise ConfigError(f"data.recipe.{name} must be [low, high] with 0 < low <= high <= 1, "
                              f"got [{low}, {high}]")
    low, high = recipe.ratio
    if not 0 < low <= high:
        raise ConfigError(f"data.recipe.ratio must be [low, high] with 0 < low <= high, got [{low}, {high}]")


def check_consistency(cfg: RunConfig) -> None:
    """Cross-section rules the per-field types cannot express, after `check_values`."""
    check_values(cfg)
    if cfg.data.weights is not None and len(cfg.data.weights) != len(cfg.data.manifests):
        raise ConfigError(f"data.weights: {len(cfg.data.weights)} given for {len(cfg.data.manifests)} manifest(s) "
                          "in data.manifest (one upsampling factor per manifest)")
    if cfg.data.recipe.image_size != cfg.model.image_size:
        raise ConfigError(f"data.recipe.image_size={cfg.data.recipe.image_size} differs from "
                          f"model.image_size={cfg.model.image_size}")
    ssl_views = objective_parts(cfg.objective.name).ssl_views
    if ssl_views and cfg.data.recipe.num_ssl_views != ssl_views:
        raise ConfigError(f"objective {cfg.objective.name} needs data.recipe.num_ssl_views={ssl_views}")
    if is_finetuning(cfg) and not cfg.data.train:
        raise ConfigError("objective classification (finetuning) needs data.train: an ImageFolder directory "
                          "or labelled shards")
    if is_finetuning(cfg) and cfg.data.recipe.num_ssl_views:
        raise ConfigError("objective classification (finetuning) trains on one view: set data.recipe.num_ssl_views=0")
    if cfg.data.text_padding == "longest" and cfg.train.compile:
        # torch.compile recompiles the first time a rank meets a second width, at a step of its own,
        # while the other ranks wait in the gradient all-reduce (dist.timeout_s is 60 s)
        raise ConfigError("data.text_padding=longest with train.compile=true: each rank would recompile at its "
                          "own step when its batches' text width first changes; use one or the other")
    if cfg.data.device != "auto":      # the augmenters' own rule (auto picks a device that fits)
        try:
            check_backend(cfg.data.backend, cfg.data.device)
        except ValueError as e:
            raise ConfigError(f"data.backend={cfg.data.backend}, data.device={cfg.data.device}: {e}") from None
