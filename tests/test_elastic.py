"""Elastic multi-node training never hangs: real torchrun agents, real gloo groups, real SIGKILLs.

- two torchrun "nodes" on localhost (c10d rendezvous, one process each) give exactly the losses of
  one node with two processes;
- one rank SIGKILLed mid-run under `--max-restarts 1`: the agent restarts the group, which resumes
  from the last checkpoint and ends with the uninterrupted losses;
- a collective whose peer was SIGKILLed, or is frozen (SIGSTOP: a hung node sends no reset),
  raises within `dist.timeout_s` instead of the old 30 minutes (tools/dead_peer_check.py);
- a restarted group whose peer starts 20 s late, on a store still holding the dead group's keys
  (torchrun's agent keeps its store across restarts), joins instead of dialling the dead
  process's address (trainer/dist_store.py);
- rank-0-only work longer than `dist.timeout_s` does not trip it; a rank 0 that dies during such
  work is noticed after `dist.timeout_s`.
Repeated kills at many points on a loaded machine: tools/bench/stress_elastic.py (opt-in).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from test_trainer import COMMON, ROOT, RUN, _free_port, make_shards, step_records

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
KEYS = ("loss", "clip_loss", "ssl_loss", "lr", "logit_scale")


def torchrun(launcher: list[str], args: list[str], timeout: int = 300) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, *RUN[1:], *args]
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(procs: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    """Exit codes and output; a run still going after `timeout` is killed and fails the test (a hang)."""
    out, deadline = [], time.monotonic() + timeout
    for p in procs:
        try:
            text, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"torchrun still running after {timeout} s: a hang")
        out.append((p.returncode, text))
    return out


def assert_same_losses(got: dict, ref: dict) -> None:
    assert sorted(got) == sorted(ref)
    for step in sorted(ref):
        for key in KEYS:
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-5, abs=1e-6), (step, key)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("elastic_shards"))


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory) -> dict:
    """The uninterrupted run: one node, two processes."""
    out = tmp_path_factory.mktemp("elastic_ref")
    [(code, text)] = finish([torchrun(["--nproc-per-node", "2", "--master-addr", "127.0.0.1",
                                       "--master-port", str(_free_port())],
                                      [*COMMON, f"data.manifest={shards}", f"out_dir={out}"])])
    assert code == 0, text[-3000:]
    return step_records(out)


def test_two_nodes_give_the_losses_of_one_node(shards, reference, tmp_path):
    port = _free_port()
    launcher = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two_nodes"]
    args = [*COMMON, f"data.manifest={shards}", f"out_dir={tmp_path}"]
    results = finish([torchrun(launcher, args), torchrun(launcher, args)])
    assert [code for code, _ in results] == [0, 0], "\n".join(t[-2000:] for _, t in results)
    assert_same_losses(step_records(tmp_path), reference)


def test_one_rank_killed_is_restarted_and_ends_with_the_same_losses(shards, reference, tmp_path):
    """Rank 1 alone SIGKILLs itself after step 10: the agent stops rank 0 and starts a new group on
    the same store; it resumes from step 8 (the first attempt only kills: TORCHELASTIC_RESTART_COUNT)."""
    launcher = ["--nproc-per-node", "2", "--max-restarts", "1", "--monitor-interval", "0.5",
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    [(code, text)] = finish([torchrun(launcher, [*COMMON, f"data.manifest={shards}", f"out_dir={tmp_path}",
                                                 "debug.sigkill_at_step=10", "debug.sigkill_rank=1"])])
    assert code == 0, text[-4000:]
    assert text.count("resumed from") == 1 and "at step 8" in text, text[-3000:]
    assert_same_losses(step_records(tmp_path), reference)


# ------------------------------------------------------------------ small gloo groups, no training

def member(rank: int, port: int, out: str, scenario: str, delay: float, timeout_s: float) -> None:
    """One rank of a 2-process group on the store at `port` (hosted by the test, like torchrun's
    agent), running `scenario`; writes what happened to `<out>/<scenario>_rank<rank>.txt`."""
    time.sleep(delay)
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="True")
    torch.set_num_threads(1)
    import torch.distributed as dist
    from trainer import distributed
    result = Path(out) / f"{scenario}_rank{rank}.txt"
    distributed.init_distributed(distributed.DistConfig(timeout_s=timeout_s, rank0_wait_s=120))
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    (Path(out) / f"{scenario}_rank{rank}.ready").write_text(str(os.getpid()))
    start = time.monotonic()
    try:
        if scenario == "join":
            result.write_text(f"ok {t.item()}")
            return
        if scenario == "rank0_slow":     # rank-0-only work three times as long as the timeout
            value = distributed.rank0_only("a slow phase", lambda: time.sleep(3 * timeout_s) or "done")
            dist.all_reduce(t)
            result.write_text(f"ok {value} {t.item()}")
            return
        if scenario == "rank0_dies" and rank == 0:
            distributed.rank0_only("a phase rank 0 dies in", lambda: os.kill(os.getpid(), signal.SIGKILL))
        distributed.rank0_only("a phase rank 0 dies in", lambda: None)     # "rank0_dies"
        result.write_text(f"no error after {time.monotonic() - start:.1f} s")
    except Exception as e:  # noqa: BLE001 - the test reads what was raised and when
        result.write_text(f"raised after {time.monotonic() - start:.1f} s: {type(e).__name__}: {e}")
    finally:
        if scenario not in ("join", "rank0_slow"):
            os._exit(0)          # no clean-up that could wait on the dead peer
        distributed.cleanup()


def start_group(store_port: int, out: Path, scenario: str, timeout_s: float = 5.0, delays=(0.0, 0.0)):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=member, args=(r, store_port, str(out), scenario, delays[r], timeout_s))
             for r in range(2)]
    for p in procs:
        p.start()
    return procs


def wait_file(path: Path, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path.name} did not appear within {timeout} s"
        time.sleep(0.1)
    return path.read_text()


@pytest.fixture
def agent_store():
    """A TCPStore hosted by the test process, as torchrun's agent hosts one for every restart."""
    import torch.distributed as dist
    port = _free_port()
    store = dist.TCPStore("127.0.0.1", port, None, is_master=True, timeout=timedelta(seconds=30),
                          wait_for_workers=False)
    yield port
    del store


@pytest.mark.parametrize("stop", ["kill", "freeze"])
def test_collective_with_a_dead_or_frozen_peer_raises_within_the_timeout(stop):
    """tools/dead_peer_check.py with gloo (tools/gpu_report.py runs it with NCCL on two GPUs)."""
    sys.path.insert(0, str(ROOT / "tools"))       # also for the spawned ranks, which import the tool
    try:
        import dead_peer_check
        result = dead_peer_check.check("gloo", stop, timeout_s=5.0)
    finally:
        sys.path.remove(str(ROOT / "tools"))
    assert result["ok"] and result["outcome"].startswith("raised"), result
    assert result["seconds"] < 20, result        # 5 s timeout; a reset peer fails at once


def test_restarted_group_with_a_late_peer_joins_despite_the_dead_groups_keys(agent_store, tmp_path):
    (tmp_path / "first").mkdir()
    first = start_group(agent_store, tmp_path / "first", "join")
    for p in first:
        p.join(120)
    assert [p.exitcode for p in first] == [0, 0]
    # the same store, now holding the first group's keys (its gloo addresses among them); rank 1
    # starts 20 s late, as a slow worker on a loaded node
    second = start_group(agent_store, tmp_path, "join", timeout_s=60.0, delays=(0.0, 20.0))
    for p in second:
        p.join(300)
    assert [p.exitcode for p in second] == [0, 0]
    assert [wait_file(tmp_path / f"join_rank{r}.txt") for r in range(2)] == ["ok 3.0"] * 2


def test_rank0_only_work_outlasts_the_timeout_and_a_dead_rank0_is_noticed(agent_store, tmp_path):
    slow = start_group(agent_store, tmp_path, "rank0_slow", timeout_s=2.0)
    for p in slow:
        p.join(120)
    assert [wait_file(tmp_path / f"rank0_slow_rank{r}.txt") for r in range(2)] == ["ok done 6.0"] * 2
    dies = start_group(agent_store, tmp_path, "rank0_dies", timeout_s=3.0)
    try:
        text = wait_file(tmp_path / "rank0_dies_rank1.txt", timeout=120)
        assert text.startswith("raised after"), text
        assert "rank 0 stopped responding during a phase rank 0 dies in" in text, text
        assert float(text.split()[2]) < 20, text
    finally:
        for p in dies:
            p.join(30)
