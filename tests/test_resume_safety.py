"""Training never runs on silently wrong state: every fault here is caused for real on real runs of
trainer/run.py (real shards, the real loader, a tiny model) and must end in a correct recovery or a
one-line error that says what to do.

- a damaged checkpoint (4 KB of 0xFF in the middle) is skipped with a warning, or stops the run;
- the non-finite streak survives a SIGKILL;
- resuming with another batch size or world size trains to the configured length, the learning
  rate continuing where it was;
- a fresh start in a used out_dir is refused (`--overwrite` moves the old run aside); a changed
  configuration or a rebuilt data set is refused by key;
- two trainers on one out_dir: the second is refused naming the first's host and PID;
- a full disk (a write pointed at /dev/full) ends in one line saying "No space left on device" and where.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
import torch

from test_trainer import COMMON, ROOT, RUN, _image, events, step_records, torchrun

from trainer import checkpoint as ckpt

# 1 process x batch 8 over 32 samples = 4 steps per epoch; 4 epochs = 16 steps, warmup 4 steps.
BASE = [*COMMON, "optim.epochs=4", "debug.inject_nan_at_steps=[]", "checkpoint.keep_every=4"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def run(args: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*RUN, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT, env=ENV)


def damage(path: Path) -> None:
    """4 KB of 0xFF written into the middle of the file, in place: same size, same name."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"\xff" * 4096)


def error_lines(proc: subprocess.CompletedProcess) -> list[str]:
    return [l for l in proc.stderr.splitlines() if l.startswith(("error:", "config error:"))]


def make_data(out: Path, caption: str = "a {color} {shape}") -> Path:
    """32 (image, caption) pairs in 2 shards; another `caption` is a rebuilt set of the same size."""
    from pipeline.shards import write_shard_set
    from test_trainer import COLORS, SHAPES
    names, samples = list(COLORS), []
    for i in range(32):
        color, shape = names[i % 4], SHAPES[i // 4 % 8]
        text = caption.format(color=color, shape=shape)
        samples.append({"jpg": _image(COLORS[color], i // 4 % 8), "txt": text,
                        "json": json.dumps({"photoid": i, "caption": text, "title": text, "description": text})})
    return write_shard_set(out, samples, 16, name="tiny")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("data") / "shards")


@pytest.fixture(scope="module")
def killed(data, tmp_path_factory) -> Path:
    """A run SIGKILLed after step 10 of 16: checkpoints at steps 4 and 8, metrics up to step 10."""
    out = tmp_path_factory.mktemp("killed") / "run"
    proc = run([*BASE, f"data.manifest={data}", f"out_dir={out}", "debug.sigkill_at_step=10"])
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    assert "never verified against its checksums" in proc.stdout      # the start report says so
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [4, 8]
    assert max(step_records(out)) == 10
    return out


def copy_run(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


# ---------------------------------------------------------------- damaged checkpoints

def test_no_verifying_checkpoint_stops_the_run(killed, data, tmp_path):
    out = copy_run(killed, tmp_path / "run")
    config_before = (out / "config.yaml").read_bytes()
    for step in (4, 8):
        damage(ckpt.checkpoint_path(out / "checkpoints", step))
    proc = run([*BASE, f"data.manifest={data}", f"out_dir={out}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    warnings = [l for l in proc.stderr.splitlines() if l.startswith("warning:")]
    assert len(warnings) == 2 and "step_00000008.pt: damaged checkpoint" in warnings[0] and "CRC-32" in warnings[0]
    assert error_lines(proc) == [l for l in proc.stderr.splitlines() if "no checkpoint in" in l]
    assert len(error_lines(proc)) == 1 and "verifies" in error_lines(proc)[0]
    assert (out / "config.yaml").read_bytes() == config_before      # nothing rewritten by a refused start


# ---------------------------------------------------------------- the non-finite streak

def test_nonfinite_streak_survives_a_kill(killed, data, tmp_path):
    """3 NaN steps, SIGKILL, 2 more NaN steps after the resume: 5 in a row stop the run (the default
    max_nonfinite), where a streak reset by the resume would count 2 and go on."""
    out = copy_run(killed, tmp_path / "run")
    args = [*BASE, f"data.manifest={data}", f"out_dir={out}", "checkpoint.every_steps=1"]
    first = run([*args, "debug.inject_nan_at_steps=[9,10,11]", "debug.sigkill_at_step=11"])
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(out / "checkpoints"))["nonfinite_in_a_row"] == 3
    second = run([*args, "debug.inject_nan_at_steps=[12,13]"])
    assert second.returncode == 3, second.stderr[-3000:]
    (line,) = error_lines(second)
    assert "5 non-finite steps in a row (last at step 13)" in line
    assert f"The last good checkpoint is {ckpt.checkpoint_path(out / 'checkpoints', 12)}" in line
    assert [e["step"] for e in events(out, "nonfinite")] == [9, 10, 11, 12, 13]


# ---------------------------------------------------------------- another batch size or world size

def _check_converted_resume(out: Path, proc: subprocess.CompletedProcess) -> None:
    """Resumed at step 8 (2 epochs of batch 8) with a global batch of 16: the schedule continues at
    epoch 2 and the run ends after 4 epochs = 128 samples, at step 8 + 4."""
    from trainer.optim import WarmupCosine
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "4 steps per epoch then, 2 now" in proc.stdout
    recs = step_records(out)
    assert sorted(recs) == list(range(1, 13))
    assert recs[8]["samples_seen"] == 64 and recs[12]["samples_seen"] == 128      # 4 epochs of 32
    state = ckpt.load_checkpoint(ckpt.latest_checkpoint(out / "checkpoints"))
    assert state["step"] == 12 and state["samples_seen"] == 128 and state["scheduler"]["step_count"] == 8
    # the lr of new step s is the rate of the batch-8 schedule at the same epoch: old step 2 * (s - 4)
    old = WarmupCosine(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1), 1e-3, 4, 16, 1e-6, 1e-5)
    for s in range(9, 13):
        assert recs[s]["lr"] == pytest.approx(old.lr_at(2 * (s - 1 - 4)), rel=1e-9), s
    assert recs[12]["lr"] > 1e-5      # not at the floor: the curve goes on, it did not jump to the end


def test_resume_with_another_batch_size_trains_to_the_configured_length(killed, data, tmp_path):
    out = copy_run(killed, tmp_path / "run")
    stale = [out / "checkpoints" / ".step_00000012.pt.tmp999999", out / ".metrics.jsonl.999999.1.tmp"]
    for p in stale:                      # left by writes killed part-way
        p.write_bytes(b"partial")
    proc = run([*BASE, f"data.manifest={data}", f"out_dir={out}", "data.batch_size=16"])
    _check_converted_resume(out, proc)
    assert not any(p.exists() for p in stale)
    assert "batch_size: 16" in (out / "config.yaml").read_text()


def test_resume_on_two_ranks_trains_to_the_configured_length(killed, data, tmp_path):
    out = copy_run(killed, tmp_path / "run")
    proc = torchrun([*BASE, f"data.manifest={data}", f"out_dir={out}"])
    _check_converted_resume(out, proc)
    assert "written by 1 ranks, now 2" in proc.stdout


# ---------------------------------------------------------------- starting over, changed configuration

def test_fresh_start_in_a_used_out_dir_is_refused_and_overwrite_moves_the_old_run(killed, data, tmp_path):
    out = copy_run(killed, tmp_path / "run")
    before = {p.name: p.read_bytes() for p in (out / "config.yaml", out / "metrics.jsonl")}
    args = [*BASE, f"data.manifest={data}", f"out_dir={out}", "optim.lr=2e-3", "optim.max_steps=2"]
    proc = run([*args, "--resume", "none"])
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert "holds an earlier run (checkpoints up to step_00000008.pt)" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in (out / "config.yaml", out / "metrics.jsonl")} == before

    proc = run([*args, "--resume", "none", "--overwrite"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    (old,) = tmp_path.glob("run.old-*")
    assert f"moved the earlier run in {out} to {old}" in proc.stdout
    assert [s for s, _ in ckpt.list_checkpoints(old / "checkpoints")] == [4, 8]
    assert {p.name: p.read_bytes() for p in (old / "config.yaml", old / "metrics.jsonl")} == before
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [2]
    assert sorted(step_records(out)) == [1, 2] and "lr: 0.002" in (out / "config.yaml").read_text()


def test_changed_config_or_rebuilt_data_is_refused_by_key(killed, data, tmp_path):
    out = copy_run(killed, tmp_path / "run")
    config_before = (out / "config.yaml").read_bytes()
    proc = run([*BASE, f"data.manifest={data}", f"out_dir={out}", "optim.lr=2e-3", "train.seed=1"])
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert "optim.lr (0.001 -> 0.002)" in line and "train.seed (0 -> 1)" in line
    assert "--allow-config-change optim.lr,train.seed" in line

    moved = tmp_path / "moved"             # the same data set elsewhere: its manifest is byte-identical
    shutil.copytree(data.parent, moved)
    rebuilt = make_data(tmp_path / "rebuilt", caption="one {color} {shape}")   # same size, other content
    shutil.copy(rebuilt, moved / "manifest.json")
    proc = run([*BASE, f"data.manifest={moved / 'manifest.json'}", f"out_dir={out}"])
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert "data.manifest (manifest sha256" in line and "rebuilt or replaced" in line
    assert (out / "config.yaml").read_bytes() == config_before

    shutil.copy(data, moved / "manifest.json")
    proc = run([*BASE, f"data.manifest={moved / 'manifest.json'}", f"out_dir={out}", "optim.max_steps=8",
                "optim.lr=2e-3", "--allow-config-change", "optim.lr"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout and "nothing to do" in proc.stdout


# ---------------------------------------------------------------- one trainer per out_dir

def test_second_trainer_on_the_same_out_dir_is_refused(data, tmp_path):
    out = tmp_path / "run"
    args = [*BASE, f"data.manifest={data}", f"out_dir={out}", "optim.epochs=100"]
    first = subprocess.Popen([*RUN, *args], cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        lock = out / "train.lock"
        deadline = time.time() + 120
        while not (lock.exists() and "pid" in lock.read_text()):
            assert first.poll() is None and time.time() < deadline, "the first trainer did not start"
            time.sleep(0.2)
        second = run(args)
        assert first.poll() is None
    finally:
        first.kill()
        first.wait()
    assert second.returncode == 2
    (line,) = error_lines(second)
    assert f"in use by another trainer (host {socket.gethostname()} pid {first.pid})" in line
    from trainer.run_dir import RunDirLock
    lock = RunDirLock(out)
    lock.acquire()            # the SIGKILLed holder left no stale lock
    lock.release()


# ---------------------------------------------------------------- a full disk

def test_full_disk_is_one_line_saying_where(data, tmp_path, monkeypatch, capsys):
    """The first checkpoint's write goes to /dev/full (its temporary file is a link there)."""
    from trainer import run as run_module
    out = tmp_path / "run"
    real_settle = run_module.settle

    def settle_then_fill_disk(*a, **k):    # after the start-up clean-up of temporary files
        settled = real_settle(*a, **k)
        (out / "checkpoints").mkdir(parents=True)
        os.symlink("/dev/full", out / "checkpoints" / f".step_00000002.pt.tmp{os.getpid()}")
        return settled

    monkeypatch.setattr(run_module, "settle", settle_then_fill_disk)
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:                                  # the trainer installs its stop-signal handlers
        rc = run_module.main([*BASE, f"data.manifest={data}", f"out_dir={out}", "optim.max_steps=2",
                              "data.backend=pillow", "train.log_every=100"])
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    assert rc == 4
    err = capsys.readouterr().err
    (line,) = [l for l in err.splitlines() if l.startswith("error:")]
    assert "No space left on device" in line and str(out / "checkpoints") in line and "rerun" in line
    assert ckpt.list_checkpoints(out / "checkpoints") == []


# ---------------------------------------------------------------- in-process: the choice itself

def test_checkpoint_with_nonfinite_weights_is_skipped(tmp_path, capsys):
    """A checkpoint that verifies byte for byte but holds NaN weights (an older trainer wrote it)."""
    from test_trainer import _in_process_trainer
    from trainer.resume import ResumeRequest, choose_checkpoint
    trainer = _in_process_trainer(tmp_path)
    trainer.save()
    good = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    state = ckpt.load_checkpoint(good)
    next(iter(state["model"].values())).fill_(float("nan"))
    torch.save({**state, "step": 4}, ckpt.checkpoint_path(tmp_path / "checkpoints", 4))
    choice = choose_checkpoint(trainer.cfg, ResumeRequest())
    assert choice.path == good and choice.state["step"] == 0
    (line,) = [l for l in capsys.readouterr().err.splitlines() if "warning:" in l]   # after a progress bar
    assert "step_00000004.pt: the checkpoint's weights are not finite" in line


def test_saving_nonfinite_weights_is_refused(tmp_path):
    from test_trainer import _in_process_trainer
    from trainer.loop import NonFiniteLossError
    trainer = _in_process_trainer(tmp_path)
    trainer.save()
    with torch.no_grad():
        next(trainer.c.model.parameters())[0] = float("inf")
    trainer.state.step = 1
    with pytest.raises(NonFiniteLossError, match="weights at step 1 are not finite; no checkpoint written. "
                                                 "The last good checkpoint is .*step_00000000.pt"):
        trainer.save()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [0]


def test_missing_shard_is_one_line_from_the_trainer(data, tmp_path):
    """A copied shard set with one shard deleted: the trainer names the missing file in one line and
    never falls back to the original build directory."""
    copy = shutil.copytree(Path(data).parent, tmp_path / "copy")
    first = sorted(copy.glob("*.tar"))[0]
    first.unlink()
    proc = run([*BASE, f"data.manifest={copy / Path(data).name}", f"out_dir={tmp_path / 'run'}"])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [l for l in proc.stderr.splitlines() if l.startswith("data error:")]
    assert len(lines) == 1 and first.name in lines[0], proc.stderr[-3000:]


def test_a_new_run_initialised_from_a_checkpoint(killed, data, tmp_path):
    """`model.init_from=PATH`: a fresh run (own schedule, step 1) that starts from another run's weights;
    its first loss is the trained model's, far below a fresh model's."""
    source = ckpt.checkpoint_path(killed / "checkpoints", 8)
    fresh = run([*BASE, f"data.manifest={data}", f"out_dir={tmp_path / 'fresh'}", "optim.max_steps=1"])
    proc = run([*BASE, f"data.manifest={data}", f"out_dir={tmp_path / 'init'}", "optim.max_steps=1",
                f"model.init_from={source}"])
    assert fresh.returncode == 0 and proc.returncode == 0, proc.stderr[-3000:]
    assert f"initialised from checkpoint: {source}" in proc.stdout and "loaded: image tower" in proc.stdout, \
        proc.stdout[-2000:]
    assert "resumed" not in proc.stdout
    first = step_records(tmp_path / "init")[1]
    trained = step_records(killed)[8]["loss"]
    assert abs(first["loss"] - trained) < abs(step_records(tmp_path / "fresh")[1]["loss"] - trained)
