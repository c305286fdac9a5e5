#!/usr/bin/env python
"""Does a collective whose peer died end within `dist.timeout_s`? A 2-process check of the real
process-group set-up (trainer/distributed.py), for gloo on CPU or NCCL on two GPUs.

Both ranks join a group and complete one all-reduce; then rank 1 is SIGKILLed (`--stop kill`: its
sockets are reset) or SIGSTOPped (`--stop freeze`: a hung node, nothing is reset) and rank 0 starts
another all-reduce. The check passes when rank 0 ends (raises, or with NCCL is torn down by the
watchdog) within the limit instead of waiting for ever.

    python tools/dead_peer_check.py --backend gloo --stop kill --timeout 5
    python tools/dead_peer_check.py --backend nccl --stop freeze      # two CUDA devices

tools/gpu_report.py runs the NCCL check where two GPUs exist; tests/test_elastic.py runs gloo.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from pipeline.cli import run_main

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank(rank: int, port: int, out: str, backend: str, timeout_s: float) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    import torch
    import torch.distributed as dist
    from trainer.distributed import DistConfig, init_distributed
    torch.set_num_threads(1)
    info = init_distributed(DistConfig(timeout_s=timeout_s, rank0_wait_s=max(60.0, timeout_s)), backend=backend)
    t = torch.ones(1, device=info.device)
    dist.all_reduce(t)
    t.item()     # completed (NCCL is asynchronous)
    out = Path(out)
    (out / f"ready{rank}").write_text(str(os.getpid()))
    if rank == 1:
        time.sleep(3600)     # stopped from outside
    while not (out / "stopped").exists():
        time.sleep(0.05)
    try:
        dist.all_reduce(t)
        t.item()
        outcome = "no error"
    except Exception as e:  # noqa: BLE001 - what ended the wait is the result
        outcome = f"raised {type(e).__name__}: {str(e).splitlines()[0][:300]}"
    (out / "outcome").write_text(outcome)
    os._exit(0)     # no clean-up that could wait on the dead peer


def check(backend: str = "gloo", stop: str = "kill", timeout_s: float = 5.0, start_limit_s: float = 180.0) -> dict:
    """Run the check; a dict with `ok`, `seconds` (stop -> rank 0 ended) and `outcome`."""
    limit = 3 * timeout_s + 30          # the timeout, plus a slow machine's slack
    with tempfile.TemporaryDirectory(prefix="dead_peer_") as tmp:
        out = Path(tmp)
        ctx = mp.get_context("spawn")
        port = _free_port()
        procs = [ctx.Process(target=_rank, args=(r, port, tmp, backend, timeout_s)) for r in range(2)]
        for p in procs:
            p.start()
        try:
            deadline = time.monotonic() + start_limit_s
            while not all((out / f"ready{r}").exists() for r in range(2)):
                if time.monotonic() > deadline or any(p.exitcode not in (None, 0) for p in procs):
                    return {"backend": backend, "stop": stop, "ok": False, "seconds": None,
                            "outcome": f"the group did not form within {start_limit_s:.0f} s "
                                       f"(exit codes {[p.exitcode for p in procs]})"}
                time.sleep(0.1)
            os.kill(procs[1].pid, signal.SIGKILL if stop == "kill" else signal.SIGSTOP)
            t0 = time.monotonic()
            (out / "stopped").write_text("1")
            procs[0].join(limit)
            seconds = time.monotonic() - t0
            ended = procs[0].exitcode is not None
            outcome = (out / "outcome").read_text() if (out / "outcome").exists() else \
                f"exit code {procs[0].exitcode}" if ended else f"still waiting after {limit:.0f} s"
            return {"backend": backend, "stop": stop, "timeout_s": timeout_s, "seconds": round(seconds, 1),
                    "ok": ended and outcome != "no error", "outcome": outcome}
        finally:
            for p in procs:
                if p.exitcode is None:
                    os.kill(p.pid, signal.SIGKILL)
                p.join()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    p.add_argument("--stop", choices=("kill", "freeze"), default="kill")
    p.add_argument("--timeout", type=float, default=5.0, help="dist.timeout_s of the group")
    a = p.parse_args(argv)
    result = check(a.backend, a.stop, a.timeout)
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(run_main(main))
