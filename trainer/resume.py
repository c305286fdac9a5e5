"""Which checkpoint a run continues from, and whether it may: rank 0 decides, every rank follows.

`checkpoint.resume` (or `--resume`):
- auto: the newest checkpoint in `<out_dir>/checkpoints` that verifies (every record matches its
  CRC-32, the weights are finite). A newer one that does not is skipped with a warning naming it;
  when none verifies the run stops. No checkpoint at all: a fresh start.
- latest: as auto, but a checkpoint must exist.
- PATH: that checkpoint, verified, with no fallback. One of this out_dir's own checkpoints must be
  its newest: a newer one would belong to a continuation that was abandoned.
- none: a fresh start.
A fresh start (or a start from a checkpoint elsewhere) in an out_dir that holds an earlier run's
checkpoints is refused: a later plain rerun would resume the old run. Use a new out_dir, or add
`--overwrite`, which moves the earlier run into a dated folder beside it
(`<out_dir>.old-YYYYmmdd-HHMMSS`); nothing is deleted.

The checkpoint's configuration must equal the current one except for the keys of `MAY_DIFFER`:
how the run executes (batch size, accumulation, precision, compile, threads, the logging,
evaluation and checkpoint cadences, debug faults, the process-group timeouts; the world size is
not configuration either).
`data.device` and `data.backend` are among them: both augmenters take the same batches and the
same per-view draws, so moving a run between DALI (CPU or GPU) and pillow changes only the
rounding of the pixels, like a change of precision. `data.text_padding` only drops padding the
causal text tower never reads.
These take effect; the trainer re-derives the schedule from the epochs done (trainer/loop.py).
Any other difference changes what is trained (model, objective, data, optimizer, schedule length,
seed) and is refused with the keys named, unless `--allow-config-change` names them. The data set
is compared by the sha256 of its manifest file (key `data.manifest`, whatever its path), so a
rebuilt data set with the same sample count is refused too. A run on several manifests (a
mixture) stores the list of their checksums: resuming with another set, another order, or a
rebuilt member is refused naming which manifest is missing, new or changed (the weights are a
configuration key like any other).
"""
from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from pipeline.regular_files import RefusedFile, open_regular
from trainer import checkpoint as ckpt
from trainer.config import RunConfig, to_dict
from trainer.distributed import rank0_only
from trainer.run_dir import RunDirLock, move_run_aside, remove_stale_temps

MAY_DIFFER = ("out_dir", "checkpoint", "eval", "debug", "dist", "objective.nclip_min_usage", "objective.nclip_min_kl",
              "data.batch_size", "data.num_threads", "data.device", "data.backend", "data.text_padding",
              "optim.accum_steps", "optim.max_steps",
              "train.precision", "train.compile", "train.torch_threads", "train.log_every", "train.peak_tflops",
              "train.find_unused_parameters", "train.static_graph", "train.max_nonfinite")
MANIFEST_KEY = "data.manifest"
# what a checkpoint of this trainer holds (load_model also reads bare weights; resuming cannot)
_TRAINING_KEYS = ("model", "optimizer", "scheduler", "step", "per_rank")


class ResumeError(RuntimeError):
    """The run may not start as asked; the message says what to do instead."""


@dataclass(frozen=True)
class ResumeRequest:
    mode: str = "auto"                        # auto | latest | none | a checkpoint path
    overwrite: bool = False                   # move an earlier run in out_dir aside
    allow_changes: tuple[str, ...] = ()       # config keys (or sections) that may differ anyway


@dataclass
class ResumeChoice:
    path: Path | None = None        # None: a fresh start
    state: dict | None = None       # the loaded checkpoint, on rank 0 (the other ranks load `path`)
    moved_to: Path | None = None    # where `overwrite` moved the earlier run


def covered(key: str, prefixes: tuple[str, ...]) -> bool:
    """`key` is one of `prefixes` or lies in a section named by one ("optim" covers "optim.lr")."""
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key))
        else:
            out[key] = v
    return out


def config_differences(saved: dict, current: RunConfig) -> dict[str, tuple]:
    """{dotted key: (saved value, current value)} where they differ. A key the saved configuration
    lacks (a field added since) counts as its default; keys no longer known are ignored."""
    now, defaults, old = _flatten(to_dict(current)), _flatten(to_dict(RunConfig())), _flatten(saved)
    diffs = {}
    for key, value in now.items():
        was = old.get(key, defaults.get(key))
        if was != value:
            diffs[key] = (was, value)
    return diffs


def manifest_sha256(path: str | Path) -> str | None:
    """sha256 of the manifest file; None when it cannot be read (the loader reports that)."""
    h = hashlib.sha256()
    try:
        with os.fdopen(open_regular(path, "a manifest"), "rb") as f:   # never blocks on a FIFO
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except (OSError, RefusedFile):
        return None
    return h.hexdigest()


def manifests_sha256(paths: list[str]) -> str | list[str | None] | None:
    """What a checkpoint records of the data: one manifest's sha256, or the list of several's."""
    sums = [manifest_sha256(p) for p in paths]
    return sums[0] if len(sums) == 1 else sums


def _source_difference(saved_sha: str | list, saved_paths, now_paths: list[str]) -> str | None:
    """None when the manifests now are the saved ones (by checksum, in order); else what differs,
    each manifest named by its file name and checksum."""
    saved = saved_sha if isinstance(saved_sha, list) else [saved_sha]
    now = [manifest_sha256(p) for p in now_paths]
    if len(now) == 1 and len(saved) == 1:
        if now[0] is None or now[0] == saved[0]:
            return None
        return (f"manifest sha256 {saved[0][:12]}... -> {now[0][:12]}...: the data set was rebuilt or replaced")
    if now == saved or None in now:          # an unreadable manifest is reported by the loader
        return None
    if not isinstance(saved_paths, list) or len(saved_paths) != len(saved):
        saved_paths = [f"manifest {i}" for i in range(len(saved))]
    label = lambda path, sha: f"{Path(str(path)).name} ({str(sha)[:12]}...)"  # noqa: E731
    gone = [label(p, h) for p, h in zip(saved_paths, saved) if h not in now]
    new = [label(p, h) for p, h in zip(now_paths, now) if h not in saved]
    parts = ([f"missing now: {', '.join(gone)}"] if gone else []) + ([f"new: {', '.join(new)}"] if new else [])
    if not parts:
        parts = ["the same manifests in another order (sample indices change)"]
    return f"the training sources differ: {'; '.join(parts)}"


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def refused_changes(state: dict, cfg: RunConfig, allow: tuple[str, ...] = ()) -> list[str]:
    """'key (saved -> current)' for every difference outside MAY_DIFFER and `allow`."""
    saved_sha = state.get("manifest_sha256")
    exempt = MAY_DIFFER + allow + ((MANIFEST_KEY,) if saved_sha else ())   # by checksum, not by path
    refused = []
    if isinstance(state.get("config"), dict):
        refused = [f"{k} ({_short(a)} -> {_short(b)})"
                   for k, (a, b) in config_differences(state["config"], cfg).items() if not covered(k, exempt)]
    if saved_sha and not covered(MANIFEST_KEY, allow):
        saved_paths = (state.get("config") or {}).get("data", {}).get("manifest") if isinstance(
            state.get("config"), dict) else None
        differs = _source_difference(saved_sha, saved_paths, cfg.data.manifests)
        if differs is not None:
            refused.append(f"{MANIFEST_KEY} ({differs})")
    return refused


def _load_usable(path: Path) -> dict:
    """The verified checkpoint, if it is a training checkpoint with finite weights."""
    state = ckpt.load_checkpoint(path)
    missing = [k for k in _TRAINING_KEYS if not (isinstance(state, dict) and k in state)]
    if missing:
        raise ckpt.CheckpointError(f"{path}: not a training checkpoint of this trainer (no {', '.join(missing)})")
    if not ckpt.weights_finite(state["model"]):
        raise ckpt.CheckpointError(f"{path}: the checkpoint's weights are not finite (NaN or inf)")
    return state


def _newest_usable(ckpt_dir: Path, found: list[tuple[int, Path]]) -> tuple[Path, dict]:
    damaged = []
    for _, path in reversed(found):
        try:
            return path, _load_usable(path)
        except ckpt.CheckpointError as e:
            print(f"warning: {e}; skipped, trying an older checkpoint", file=sys.stderr, flush=True)
            damaged.append(path.name)
    raise ResumeError(f"no checkpoint in {ckpt_dir} verifies ({', '.join(damaged)}); restore a good copy, "
                      "or start over with --resume none --overwrite (which keeps this run in a dated folder)")


def choose_checkpoint(cfg: RunConfig, request: ResumeRequest) -> ResumeChoice:
    """Rank 0's decision (module docstring); call with the run directory locked. No collectives."""
    out = Path(cfg.out_dir)
    ckpt_dir = out / "checkpoints"
    mode = request.mode
    found = ckpt.list_checkpoints(ckpt_dir)
    named = None if mode in ("auto", "latest", "none") else Path(mode)
    own = named is not None and named.resolve().parent == ckpt_dir.resolve()
    if request.overwrite and (named is None and mode != "none" or own):
        raise ResumeError("--overwrite starts a new run in out_dir: combine it with --resume none (or with a "
                          "checkpoint outside out_dir)")
    moved = None
    if found and (mode == "none" or named is not None and not own):
        if not request.overwrite:
            what = "start a fresh run" if mode == "none" else f"start from {named}"
            raise ResumeError(f"{out} holds an earlier run (checkpoints up to {found[-1][1].name}); to {what}, "
                              "use a new out_dir, or add --overwrite to move that run into a dated folder beside it")
        moved = move_run_aside(out)
        print(f"moved the earlier run in {out} to {moved}", flush=True)
    if mode == "none":
        return ResumeChoice(moved_to=moved)
    if named is not None:
        path, state = named, _load_usable(named)    # a named checkpoint has no fallback
        newer = [p.name for s, p in found if own and s > int(state["step"])]
        if newer:
            raise ResumeError(f"{out} holds checkpoints newer than {named.name} ({', '.join(newer)}); move them "
                              "out of the way to continue from it, or use a new out_dir")
    elif found:
        path, state = _newest_usable(ckpt_dir, found)
    elif mode == "latest":
        raise ResumeError(f"--resume latest: no checkpoint in {ckpt_dir}")
    else:
        return ResumeChoice(moved_to=moved)
    refused = refused_changes(state, cfg, request.allow_changes)
    if refused:
        keys = ",".join(r.split(" ", 1)[0] for r in refused)
        raise ResumeError(f"{path}: this run's configuration differs from the checkpoint's in {'; '.join(refused)}, "
                          "which changes what is trained: restore the values, use a new out_dir, or pass "
                          f"--allow-config-change {keys}")
    return ResumeChoice(path, state, moved)


def settle(cfg: RunConfig, request: ResumeRequest, rank: int) -> tuple[RunDirLock | None, ResumeChoice]:
    """Rank 0 locks out_dir (held until the process exits), removes the temporary files of killed
    writes and chooses the checkpoint; every rank gets the same choice, or stops with the same error
    (the original exception on rank 0, a ResumeError with its message elsewhere)."""
    lock, choice, error = None, ResumeChoice(), None

    def decide() -> tuple[str | None, str | None]:   # rank 0 only: verifying a large checkpoint takes a while
        nonlocal lock, choice, error
        try:
            lock = RunDirLock(cfg.out_dir)
            lock.acquire()
            remove_stale_temps(cfg.out_dir)
            choice = choose_checkpoint(cfg, request)
        except Exception as e:    # every rank must hear of it, or the others wait forever
            error = e
        return str(choice.path) if choice.path else None, str(error) if error is not None else None
    path, message = rank0_only("choosing the checkpoint to resume from", decide)
    if error is not None:
        if lock is not None:
            lock.release()
        raise error
    if message is not None:
        raise ResumeError(message)
    if rank != 0:
        choice = ResumeChoice(Path(path) if path else None)
    return lock, choice
