"""Process-group setup from the environment (torchrun or SLURM) and the collectives the losses use.

Rank/world come from RANK/WORLD_SIZE/LOCAL_RANK (torchrun) or SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID
(srun); the rendezvous from MASTER_ADDR/MASTER_PORT (under SLURM MASTER_ADDR defaults to the first
host of SLURM_JOB_NODELIST, MASTER_PORT to 29500). Backend: nccl on GPU, gloo on CPU. Without any of
these variables the run is a single process and no process group is created.

The local CUDA device is `local_rank % device_count`: torchrun shows every GPU of the node to every
process (device = local rank), while SLURM with `--gpus-per-task=1` shows each task only its own
GPU, as device 0, whatever its local rank.

Timeouts (`DistConfig`, the `dist` section of the run config): every collective, the store and
gloo's connection set-up wait `dist.timeout_s` (60 s) for a peer, so a dead peer ends the group
within about a minute and torchrun's elastic agent can restart it. Work that only rank 0 does
(checkpoint writing, evaluation, checking the checkpoint to resume from) is waited for through
the store with its own limit, `dist.rank0_wait_s`, while rank 0's heartbeat shows it is alive
(trainer/dist_store.py). Each group's keys live under a prefix no earlier group used, so a
restarted group never reads a dead group's addresses (see trainer/dist_store.py for why).

Gradient conventions (see trainer/objectives.py): every loss is a mean over the LOCAL batch (or a
term identical on every rank), DDP averages gradients over ranks, and the differentiable collectives
below sum the incoming gradient over ranks in backward. Together this reproduces the one-process
full-batch gradient exactly.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist

from trainer.dist_store import Coordinator, PeerLost, fresh_namespace

__all__ = ["DistConfig", "DistInfo", "PeerLost", "all_ranks", "broadcast_object", "cleanup", "init_distributed",
           "rank0_only"]


@dataclass
class DistConfig:
    timeout_s: float = 60.0        # a collective, the store or the group set-up waits this long for a peer
    rank0_wait_s: float = 3600.0   # the other ranks wait this long for rank-0-only work (checkpoint, evaluation)

    def __post_init__(self):
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")
        if not self.rank0_wait_s >= self.timeout_s:
            raise ValueError(f"rank0_wait_s must be >= timeout_s ({self.timeout_s}), got {self.rank0_wait_s}")


_coordinator: Coordinator | None = None


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    device: torch.device = torch.device("cpu")

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def local_device_index(local_rank: int, device_count: int) -> int:
    """This process's CUDA device among the `device_count` it can see (see the module docstring)."""
    if device_count < 1:
        raise RuntimeError(f"local rank {local_rank}: no visible CUDA device")
    return local_rank % device_count


def cuda_device_index(device: torch.device, current: int | None = None) -> int:
    """The index of CUDA `device`; `torch.device("cuda")` (index None) means the current device,
    `current` if given, else `torch.cuda.current_device()`."""
    if device.type != "cuda":
        raise ValueError(f"{device} is not a CUDA device")
    if device.index is not None:
        return device.index
    return torch.cuda.current_device() if current is None else current


def _local_cuda_device(local_rank: int) -> torch.device:
    return torch.device("cuda", local_device_index(local_rank, torch.cuda.device_count()))


def _env_int(*names: str) -> int | None:
    for name in names:
        if os.environ.get(name):
            return int(os.environ[name])
    return None


def _slurm_master_addr() -> str:
    nodelist = os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if not nodelist:
        raise RuntimeError("SLURM run without MASTER_ADDR and without SLURM_JOB_NODELIST")
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist],
                             capture_output=True, text=True, check=True).stdout
        return out.split()[0]
    except (OSError, subprocess.CalledProcessError, IndexError) as e:
        raise RuntimeError(f"cannot resolve the first host of {nodelist!r} (set MASTER_ADDR): {e}") from e


def init_distributed(cfg: DistConfig | None = None, backend: str | None = None) -> DistInfo:
    """Initialise torch.distributed from torchrun or SLURM variables; a no-op for a single process."""
    global _coordinator
    if dist.is_available() and dist.is_initialized():
        return current()
    cfg = cfg or DistConfig()
    rank = _env_int("RANK", "SLURM_PROCID")
    world_size = _env_int("WORLD_SIZE", "SLURM_NTASKS")
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    cuda = torch.cuda.is_available()
    device = _local_cuda_device(local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if rank is None or world_size is None or world_size <= 1:
        return DistInfo(device=device)
    if "MASTER_ADDR" not in os.environ and "SLURM_PROCID" in os.environ and "RANK" not in os.environ:
        os.environ["MASTER_ADDR"] = _slurm_master_addr()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29500")
    backend = backend or ("nccl" if cuda else "gloo")
    timeout = timedelta(seconds=cfg.timeout_s)
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    # torchrun's agent hosts the store (and keeps it across restarts); under srun rank 0 hosts it.
    # A client retries connecting until the timeout: a store host that starts late is waited for.
    hosts = rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True"

    def connect() -> dist.Store:
        return dist.TCPStore(host, port, world_size, is_master=False, timeout=timeout)

    base = dist.TCPStore(host, port, world_size, is_master=hosts, timeout=timeout, wait_for_workers=False)
    prefix = fresh_namespace(base, rank, world_size, cfg.timeout_s)
    store = dist.PrefixStore(prefix, base)
    dist.init_process_group(backend, rank=rank, world_size=world_size, store=store, timeout=timeout)
    _coordinator = Coordinator(store, lambda: dist.PrefixStore(prefix, connect()), rank, world_size,
                               cfg.timeout_s, cfg.rank0_wait_s)
    return DistInfo(rank, world_size, local_rank, backend, device)


def current() -> DistInfo:
    if not (dist.is_available() and dist.is_initialized()):
        return DistInfo()
    local_rank = _env_int("LOCAL_RANK", "SLURM_LOCALID") or 0
    cuda = dist.get_backend() == "nccl"
    return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank, dist.get_backend(),
                    _local_cuda_device(local_rank) if cuda else torch.device("cpu"))


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank0_only(what: str, fn: Callable[[], Any]) -> Any:
    """`fn()` on rank 0 only, its (picklable) result on every rank; the other ranks wait with the
    long limit `dist.rank0_wait_s` while rank 0 is alive (trainer/dist_store.py)."""
    if _coordinator is None or get_world_size() == 1:
        return fn()
    return _coordinator.rank0_only(what, fn)


def all_ranks(what: str, fn: Callable[[], Any]) -> Any:
    """`fn()` on every rank, then wait with the long limit until all have finished."""
    if _coordinator is None or get_world_size() == 1:
        return fn()
    return _coordinator.all_ranks(what, fn)


def broadcast_object(obj, src: int = 0):
    """`obj` of rank `src` on every rank (a picklable value: a decision, a path, an error message).
    A collective under the short timeout: use `rank0_only` when `src` may first work for long."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def cleanup():
    global _coordinator
    _coordinator = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0, without gradient (rank order)."""
    if get_world_size() == 1:
        return x.detach()
    parts = [torch.empty_like(x) for _ in range(get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts)


@torch.no_grad()
def all_reduce_no_grad(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """A copy of `x` reduced over ranks ("sum" or "max"), without gradient."""
    x = x.detach().clone()
    if get_world_size() > 1:
        dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return x


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.batch = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        # every rank's loss depends on our rows: sum their gradients, keep our slice
        grad = grad.contiguous().clone()  # never modify autograd's buffer in place
        dist.all_reduce(grad)
        r = dist.get_rank()
        return grad[r * ctx.batch:(r + 1) * ctx.batch]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0; backward sums gradients over ranks (equal local batches)."""
    if get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


class _AllReduceWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


def all_reduce_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Sum over ranks; backward sums gradients over ranks."""
    if get_world_size() == 1:
        return x
    return _AllReduceWithGrad.apply(x)
