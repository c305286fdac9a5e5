"""The builder after real kills: the main process alone (its img2dataset workers outlive it), one
worker, the whole process group; and two builders on one output directory.

Every build is the real CLI (real img2dataset, spawned workers) against a loopback image server
in a process of its own, so it outlives a killed builder, or dies and restarts when a test says
so. After each kill, ONE rerun of the same command must exit 0 with exactly the samples (keys and
captions) of an uninterrupted build, no duplicates, and `shards_redone_on_resume` equal to the
shards the killed run had started and not finished (each of them downloaded again by the rerun,
by its stats file's start time; the shards it had finished are kept, not downloaded again).
Kill points are chosen from the output directory: two shards accepted and others being written.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from pipeline.build_lock import BuildLock, BuildLocked, _pid_start
from pipeline.manifest import load_manifest
from pipeline.shards import file_sha256, iter_tar_samples

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": str(ROOT)}
SLOW = 0.05          # seconds per image while a run is to be killed: a shard of 48 takes ~1.2 s per worker
TIMEOUT = 240        # one build on a loaded 2-core machine takes 15-45 s

SERVER = r"""
import sys, threading, time
from pathlib import Path
from demokit.http_server import ImageServer
root, port, control = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
for attempt in range(100):
    try:
        srv = ImageServer(root, port=port).start()
        break
    except OSError:          # the port of a server just killed: free again in a moment
        time.sleep(0.1)
def follow():                # the delay per image comes from a file, so a test can change it
    while True:
        try:
            srv.delay_seconds = float(control.read_text() or 0)
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
threading.Thread(target=follow, daemon=True).start()
print(srv.port, flush=True)
threading.Event().wait()
"""


class Server:
    """The image server in a process of its own."""

    def __init__(self, root: Path, control: Path):
        self.root, self.control, self.port, self.proc = root, control, 0, None

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(self.root), str(self.port), str(self.control)],
                                     env=ENV, stdout=subprocess.PIPE, text=True)
        self.port = int(self.proc.stdout.readline())
        return self

    def kill(self):
        self.proc.kill()
        self.proc.wait()

    def delay(self, seconds: float):
        self.control.write_text(str(seconds))
        time.sleep(0.2)      # the server reads it every 0.05 s


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    from demokit.data import DemoDataConfig, generate
    d = tmp_path_factory.mktemp("kill")
    meta, subset = generate(DemoDataConfig(out=d, samples=240, eval_per_class=1, workers=1))
    server = Server(d / "source" / "images", d / "delay").start()
    server.delay(0)
    yield meta, subset, server
    server.kill()


def command(source, out: Path, processes: int = 1) -> list[str]:
    meta, subset, server = source
    return [sys.executable, "tools/build_yfcc15m.py", "--metadata", str(meta), "--subset", str(subset),
            "--out", str(out), "--name", "k", "--manifest-dir", str(out / "manifests"),
            "--url-template", f"http://127.0.0.1:{server.port}/data/images/{{hash[0:3]}}/{{hash[3:6]}}/{{hash}}.jpg",
            "--allow-private-network", "--processes", str(processes), "--threads", "2", "--shard-size", "48",
            "--image-size", "48", "--timeout", "5", "--no-progress"]


def start(source, out: Path, log: str = "stderr.txt", processes: int = 1) -> subprocess.Popen:
    """A build in a process group of its own (its workers stay in it when they are orphaned)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / log, "w") as err:
        return subprocess.Popen(command(source, out, processes), cwd=ROOT, env=ENV, start_new_session=True, text=True,
                                stdout=subprocess.DEVNULL, stderr=err)


def run(source, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run(command(source, out), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)


def wait_for(what: str, predicate, timeout: float = TIMEOUT, proc: subprocess.Popen | None = None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the build ended (status {proc.returncode}) before {what}")
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def accepted(out: Path) -> set[str]:
    return {p.name.split("_")[0] for p in (out / "shards").glob("*_stats.json")}


def writers(out: Path, group: int) -> dict[int, str]:
    """Processes of the build's process group with a shard tar of a download directory open: pid -> tar."""
    found = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == group:
            continue
        try:
            if os.getpgid(int(d.name)) != group:
                continue
            for fd in (d / "fd").iterdir():
                target = os.readlink(fd)
                if target.startswith(str(out / "download")) and target.endswith(".tar"):
                    found[int(d.name)] = target
        except OSError:
            continue
    return found


def size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 1 << 62


def group_members(group: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    alive = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and os.getpgid(int(d.name)) == group:
                if (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
                    alive.append(int(d.name))
        except OSError:
            continue
    return alive


def kill_point(out: Path, proc: subprocess.Popen, workers: int = 1) -> dict[int, str]:
    """Wait until two shards are accepted while `workers` others are being written; returns the writers."""
    def ready():
        w = writers(out, proc.pid)
        return w if len(accepted(out)) >= 2 and len(w) >= workers else None
    return wait_for("two shards accepted and others being written", ready, proc=proc)


def started_not_accepted(out: Path) -> set[str]:
    """Shards with any file in a download directory and none accepted: what the rerun must redo."""
    ids = {p.name.split(".")[0].split("_")[0] for d in (out / "download").glob("gen-*") for p in d.iterdir()
           if p.name[:5].isdigit()}
    return ids - accepted(out)


def content(manifest) -> list[tuple[str, str]]:
    """(key, caption) of every sample, sorted (img2dataset writes a shard's samples as they arrive)."""
    samples = []
    for tar in manifest.shard_paths():
        with tarfile.open(tar) as t:
            for key, parts in iter_tar_samples(t):
                samples.append((key, t.extractfile(parts["txt"]).read().decode()))
    return sorted(samples)


def start_times(out: Path) -> dict[str, float]:
    return {p.name.split("_")[0]: json.loads(p.read_text())["start_time"]
            for p in (out / "shards").glob("*_stats.json")}


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference")
    proc = run(source, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = load_manifest(out / "manifests" / "k.json")
    samples = content(m)
    assert len(samples) == m.total_samples >= 200 and len(m.shards) == 5
    assert m.stats["download"]["shards_redone_on_resume"] == 0
    return m, samples


def rerun_and_check(source, out: Path, reference, kept: set[str], redo: set[str]):
    """One rerun: exit 0, the reference's samples, the kept shards not downloaded again, `redo` redone."""
    t0 = time.time()
    proc = run(source, out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_result(out, reference, kept, redo, t0)


def check_result(out: Path, reference, kept: set[str], redo: set[str], rerun_started: float):
    ref_manifest, ref_samples = reference
    m = load_manifest(out / "manifests" / "k.json")
    samples = content(m)
    assert samples == ref_samples                       # same keys and captions: nothing missing or doubled
    assert len({k for k, _ in samples}) == len(samples)
    assert [(s.path, s.samples) for s in m.shards] == [(s.path, s.samples) for s in ref_manifest.shards]
    for entry, tar in zip(m.shards, m.shard_paths()):
        assert file_sha256(tar) == entry.sha256
    assert m.stats["download"]["attempted"] == ref_manifest.stats["download"]["attempted"]
    assert m.stats["download"]["failures"] == ref_manifest.stats["download"]["failures"]
    when = start_times(out)
    assert kept and all(when[s] < rerun_started for s in kept), "a finished shard was downloaded again"
    assert redo and all(when[s] >= rerun_started for s in redo)
    assert m.stats["download"]["shards_redone_on_resume"] == len(redo)
    assert not (out / "download").exists() and not list((out / "shards").glob("_tmp"))


def test_main_process_killed_orphans_outlive_it(source, reference, tmp_path):
    """SIGKILL of the main process alone, the image server dying with it (as the demo's does): one
    orphaned worker finishes a shard of failures before the rerun, another (held stopped) goes on
    writing during the rerun. Neither can change what the rerun accepts, and both exit by
    themselves after their shard, as does img2dataset's logger process."""
    meta, subset, server = source
    out = tmp_path / "out"
    server.delay(SLOW)
    try:
        proc = start(source, out, processes=2)
        workers = kill_point(out, proc, workers=2)
        # the orphan left running is the one with more of its shard to go: its downloads will fail
        other, held = sorted(list(workers)[:2], key=lambda pid: size(workers[pid]))
        os.kill(held, signal.SIGSTOP)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        server.kill()
        kept = accepted(out)
        # the other orphan finishes its shard after its run died, its downloads failing now
        gen = next((out / "download").glob("gen-*"))
        wait_for("an orphaned worker to finish a shard", lambda: list(gen.glob("*_stats.json")))
        os.killpg(proc.pid, signal.SIGSTOP)           # hold every orphan still there
        finished_by_orphan = [json.loads(p.read_text()) for p in gen.glob("*_stats.json")]
        assert any(s["failed_to_download"] > 0 for s in finished_by_orphan), finished_by_orphan
        redo = started_not_accepted(out)
        assert accepted(out) == kept and redo
        server.start()
        server.delay(0)
        t0 = time.time()
        rerun = subprocess.Popen(command(source, out, processes=2), cwd=ROOT, env=ENV, text=True,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # the orphans go on as soon as the rerun downloads, into their own run's directory
        wait_for("the rerun's download", lambda: [d for d in (out / "download").glob("gen-*") if d != gen],
                 proc=rerun)
        os.killpg(proc.pid, signal.SIGCONT)
        _, err = rerun.communicate(timeout=TIMEOUT)
        assert rerun.returncode == 0, err[-3000:]
        # the orphans finish the shard they were on (into their dead run's directory), then exit
        wait_for("the orphans to exit", lambda: not group_members(proc.pid), timeout=120)
        check_result(out, reference, kept, redo, t0)
    finally:
        server.delay(0)
        if server.proc.poll() is not None:
            server.start()
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_one_worker_killed(source, reference, tmp_path):
    """SIGKILL of one img2dataset worker (the OOM killer's choice): the build ends by itself with
    one line naming it, instead of waiting forever for the lost shard; one rerun finishes it."""
    out = tmp_path / "out"
    source[2].delay(SLOW)
    try:
        proc = start(source, out)
        victim = sorted(kill_point(out, proc))[0]
        os.kill(victim, signal.SIGKILL)
        assert proc.wait(timeout=TIMEOUT) == 2
    finally:
        source[2].delay(0)
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    errors = [line for line in (out / "stderr.txt").read_text().splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    last = errors[0]
    assert last.startswith(f"error: img2dataset worker PID {victim} was killed by SIGKILL"), last
    assert last.endswith("rerun the same command to download the rest"), last
    kept = accepted(out)
    redo = set(json.loads((out / "state" / "resume.json").read_text())["started"])
    assert kept and redo and not kept & redo and not (out / "download").exists()
    rerun_and_check(source, out, reference, kept, redo)


def test_two_builders_then_process_group_killed(source, reference, tmp_path):
    """Two builders started at once on one directory: one refuses with one line naming the other's
    host and PID, and writes nothing. Then the whole process group of the other is SIGKILLed."""
    out = tmp_path / "out"
    source[2].delay(SLOW)
    try:
        a, b = start(source, out, "a.txt"), start(source, out, "b.txt")
        # exactly one refuses, at once
        loser = wait_for("one builder to refuse", lambda: next((p for p in (a, b) if p.poll() is not None), None))
        winner = b if loser is a else a
        assert loser.returncode == 2 and winner.poll() is None
        err = [line for line in open(out / ("a.txt" if loser is a else "b.txt")) if line.startswith("error:")]
        assert len(err) == 1, err
        assert f"is being built by another builder (host {socket.gethostname()}, PID {winner.pid}," in err[0]
        assert "wait for it to end, or if it no longer runs, delete that lock file and rerun" in err[0]
        kill_point(out, winner)
        assert len(list((out / "download").glob("gen-*"))) == 1
        os.killpg(winner.pid, signal.SIGKILL)
        winner.wait()
    finally:
        source[2].delay(0)
        for p in (a, b):
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    kept, redo = accepted(out), started_not_accepted(out)
    rerun_and_check(source, out, reference, kept, redo)


# ---------------------------------------------------------------- the lock itself (no build)

HOLD = "import sys, time; from pipeline.build_lock import BuildLock\nwith BuildLock(sys.argv[1]):\n" \
       "    print('held', flush=True); time.sleep(float(sys.argv[2]))\n"


def write_lock(out: Path, n: int, **fields):
    d = out / "state" / "lock"
    d.mkdir(parents=True, exist_ok=True)
    holder = {"host": socket.gethostname(), "pid": os.getpid(), "pid_start": _pid_start(os.getpid()),
              "token": "feedbeef", "since": time.time(), **fields}
    (d / f"gen-{n:06d}.lock").write_text(json.dumps(holder))


def test_lock_refuses_a_holder_on_another_host(tmp_path):
    write_lock(tmp_path, 3, host="node-17", pid=4242)
    with pytest.raises(BuildLocked, match=r"being built by another builder \(host node-17, PID 4242, since .*"
                                          r"gen-000003\.lock\); wait for it to end"):
        BuildLock(tmp_path).__enter__()


def test_lock_takes_over_from_a_dead_or_reused_pid(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_lock(tmp_path, 4, pid=dead.pid, pid_start="1:S")
    with BuildLock(tmp_path) as lock:
        assert lock.generation == 5 and [p.name for p in (tmp_path / "state" / "lock").iterdir()] == ["gen-000005.lock"]
        with BuildLock(tmp_path) as inner:          # reentrant in the holding process
            assert (inner.generation, inner.token) == (lock.generation, lock.token)
        assert lock.path.exists()
    assert not list((tmp_path / "state" / "lock").iterdir())
    # a live PID that is another process now (its start time differs): stale too
    write_lock(tmp_path, 8, pid_start="1:S")
    with BuildLock(tmp_path) as lock:
        assert lock.generation == 9


def test_lock_race_has_one_winner(tmp_path):
    procs = [subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path), "120"], cwd=ROOT, env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(4)]
    try:
        wait_for("three of four to refuse", lambda: sum(p.poll() is not None for p in procs) >= 3, timeout=60)
        winner = next(p for p in procs if p.poll() is None)
        assert winner.stdout.readline() == "held\n"
        for p in procs:
            if p is not winner:
                err = p.stderr.read()
                assert p.returncode == 1 and f"another builder (host {socket.gethostname()}, PID {winner.pid}," in err
    finally:
        for p in procs:
            p.kill()
            p.wait()
