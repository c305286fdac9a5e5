#!/usr/bin/env python
"""Opt-in stress test of elastic training: repeated SIGKILLs of one worker under torchrun elastic.

Each trial starts two torchrun "nodes" on localhost (c10d rendezvous, one gloo process each,
`--max-restarts 1`), SIGKILLs the worker of one rank once the run's metrics reach a given step
(from outside, by PID, so any point of the loop can be hit: a step, a checkpoint write, the
restart itself), and classifies the outcome against an uninterrupted run measured first:

- recovered: both agents exit 0 and every step's loss equals the uninterrupted run's;
- wrong: exit 0 but some loss differs (or a step is missing);
- failed: an agent exits non-zero (a failed reconnect spends the one restart);
- hung: no exit within `--deadline` seconds; py-spy (if on PATH) dumps every worker's stacks.

    python tools/bench/stress_elastic.py --trials 6 --load 2     # 2 busy-looping processes load the machine

Prints one line per trial and the counts. Not part of the test suite (minutes per trial on 2 cores).
"""
from __future__ import annotations

import argparse
import io
import json
import multiprocessing as mp
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

COMMON = ["model.preset=vit_tiny", "objective.name=slip", "data.recipe.image_size=64",
          "data.recipe.jitter_prob=0", "data.recipe.grayscale_prob=0", "data.recipe.blur_prob=0",
          "data.batch_size=8", "data.num_threads=1", "optim.lr=1e-3", "optim.epochs=8",
          "optim.warmup_epochs=1", "train.log_every=1", "train.torch_threads=1",
          "checkpoint.every_steps=4", "checkpoint.keep_every=0", "eval.data=null"]


def make_data(out: Path) -> Path:
    """32 coloured shapes with captions in 2 shards."""
    from PIL import Image, ImageDraw
    from pipeline.shards import write_shard_set
    colors = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
    samples = []
    for i in range(32):
        name = list(colors)[i % 4]
        img = Image.new("RGB", (96, 96), (128, 128, 128))
        ImageDraw.Draw(img).rectangle((8 * (i // 4), 10, 40 + 6 * (i // 4), 80), fill=colors[name])
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        text = f"a {name} bar {i // 4}"
        samples.append({"jpg": buf.getvalue(), "txt": text, "json": json.dumps({"photoid": i, "caption": text})})
    return write_shard_set(out, samples, 16, name="stress")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}


def losses(run_dir: Path) -> dict[int, float]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if "event" not in rec and "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def reference(manifest: Path, out: Path, extra: list[str]) -> dict[int, float]:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "trainer/run.py", *COMMON, *extra,
           f"data.manifest={manifest}", f"out_dir={out}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        sys.exit(f"reference run failed:\n{proc.stderr[-3000:]}")
    return losses(out)


def children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            return [int(x) for x in f.read().split()]
    except OSError:
        return []


def worker_rank(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            for item in f.read().split(b"\0"):
                if item.startswith(b"RANK="):
                    return int(item[5:])
    except (OSError, ValueError):
        return None
    return None


def dump_stacks(pids: list[int], where: Path) -> None:
    spy = shutil.which("py-spy")
    for pid in pids:
        text = "py-spy not on PATH"
        if spy:
            text = subprocess.run([spy, "dump", "--native", "--pid", str(pid)], capture_output=True, text=True,
                                  timeout=120).stdout
        (where / f"stacks_{pid}.txt").write_text(text)


def trial(manifest: Path, out: Path, ref: dict[int, float], kill_step: int, kill_rank: int, deadline: float,
          extra: list[str]) -> tuple[str, str]:
    port, logs = free_port(), []
    agents = []
    for node in range(2):
        log = open(out.parent / f"{out.name}.node{node}.log", "w")
        logs.append(log)
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", out.name,
               "--max-restarts", "1", "--monitor-interval", "0.5", "trainer/run.py", *COMMON, *extra,
               f"data.manifest={manifest}", f"out_dir={out}"]
        agents.append(subprocess.Popen(cmd, cwd=ROOT, env=env(), stdout=log, stderr=subprocess.STDOUT))
    start, killed = time.monotonic(), None
    try:
        while time.monotonic() - start < deadline:
            if all(a.poll() is not None for a in agents):
                break
            if killed is None and max(losses(out), default=0) >= kill_step:
                for a in agents:
                    for w in children(a.pid):
                        if worker_rank(w) == kill_rank:
                            os.kill(w, signal.SIGKILL)
                            killed = w
            time.sleep(0.2)
        else:
            workers = [w for a in agents for w in children(a.pid)]
            dump_stacks(workers, out.parent)
            return "hung", f"no exit after {deadline:.0f} s; stacks of {workers} in {out.parent}"
    finally:
        for a in agents:
            if a.poll() is None:
                for w in children(a.pid):
                    os.kill(w, signal.SIGKILL)
                a.kill()
            a.wait()
        for log in logs:
            log.close()
    codes = [a.returncode for a in agents]
    if killed is None:
        return "no-kill", f"the run ended before step {kill_step}"
    if any(codes):
        text = " | ".join((out.parent / f"{out.name}.node{n}.log").read_text()[-300:].replace("\n", " ")
                          for n in range(2))
        return "failed", f"exit codes {codes}: {text}"
    got = losses(out)
    bad = [s for s in ref if s not in got or abs(got[s] - ref[s]) > 1e-5 * max(1.0, abs(ref[s]))]
    if bad:
        return "wrong", f"steps {bad[:5]} differ"
    return "recovered", f"{time.monotonic() - start:.0f} s"


def _spin(stop) -> None:
    while not stop.is_set():
        pass


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=6)
    p.add_argument("--kill-steps", default="2,5,8,11", help="steps (cycled) after which the worker is killed")
    p.add_argument("--load", type=int, default=0, help="busy-looping processes loading the machine")
    p.add_argument("--deadline", type=float, default=420, help="seconds before a trial counts as hung")
    p.add_argument("--work", default=None, help="directory for runs and logs (default: a temporary one)")
    p.add_argument("overrides", nargs="*", help="extra trainer overrides, e.g. dist.timeout_s=60")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="stress_elastic_"))
    work.mkdir(parents=True, exist_ok=True)
    stop = mp.Event()
    spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.load)]
    for s in spinners:
        s.start()
    try:
        manifest = make_data(work / "data")
        ref = reference(manifest, work / "reference", args.overrides)
        steps = [int(s) for s in args.kill_steps.split(",")]
        counts: dict[str, int] = {}
        for i in range(args.trials):
            kill_step, kill_rank = steps[i % len(steps)], i % 2
            t0 = time.monotonic()
            outcome, detail = trial(manifest, work / f"trial{i}", ref, kill_step, kill_rank, args.deadline,
                                    args.overrides)
            counts[outcome] = counts.get(outcome, 0) + 1
            print(f"trial {i}: kill rank {kill_rank} after step {kill_step}: {outcome} "
                  f"({time.monotonic() - t0:.0f} s) {detail}", flush=True)
    finally:
        stop.set()
        for s in spinners:
            s.join()
    print("counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())) + f" (load {args.load}, {work})")
    return 0 if set(counts) <= {"recovered"} else 1


if __name__ == "__main__":
    sys.exit(main())
