"""End-to-end trainer tests on real shards, the real DALI loader, real models and real 2-process
gloo DDP (torchrun subprocesses):

- a DDP run finishes, ranks hold identical parameters, the loss falls on a tiny overfit set, an
  injected NaN step is skipped and reported, metrics.jsonl has every field, MFU combines both
  ranks' FLOPs per sample with the text counted at its trimmed width;
- the same run SIGKILLed mid-training and resumed gives the same per-step losses, also when its
  latest checkpoint was damaged afterwards (rank 0 picks the newest one that verifies for all ranks);
- repeated non-finite steps stop the run with a clear message and a loadable last checkpoint.
"""
from __future__ import annotations

import io
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RUN = [sys.executable, str(ROOT / "trainer" / "run.py")]
STEPS = 16            # 2 ranks x batch 8 over 32 samples = 2 steps per epoch -> 8 epochs
# A tiny overfit run: light augmentation (large crops, no colour or blur) so 16 steps can memorise;
# with the full recipe SimCLR stays at chance that early and the loss curve says nothing.
COMMON = ["model.preset=vit_tiny", "objective.name=slip", "data.recipe.image_size=64",
          "data.recipe.ssl_scale=[0.6,1.0]", "data.recipe.jitter_prob=0", "data.recipe.grayscale_prob=0",
          "data.recipe.blur_prob=0",
          "data.batch_size=8", "data.num_threads=1", "optim.lr=1e-3", "optim.epochs=8",
          "optim.warmup_epochs=1", "train.log_every=1", "train.torch_threads=1",
          "checkpoint.every_steps=4", "checkpoint.keep_every=0", "eval.data=null",
          "debug.inject_nan_at_steps=[3]",
          # captions cut past the longest (<= 8 tokens here); a peak FLOP/s so the CPU run logs MFU
          "data.text_padding=longest", "train.peak_tflops=1"]

COLORS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 220), "yellow": (230, 220, 40)}
SHAPES = ("square", "stripe", "dot", "frame", "cross", "corner", "bar", "ring")


def _image(color, shape: int, size: int = 96) -> bytes:
    from PIL import Image, ImageDraw
    img = Image.new("RGB", (size, size), (128, 128, 128))
    d = ImageDraw.Draw(img)
    boxes = [(20, 20, 76, 76), (0, 40, 96, 56), (40, 40, 56, 56), (4, 4, 92, 92),
             (44, 0, 52, 96), (0, 0, 40, 40), (0, 70, 96, 90), (24, 24, 72, 72)]
    (d.rectangle if shape not in (2, 7) else d.ellipse)(boxes[shape], fill=color if shape != 3 else None,
                                                       outline=color, width=6)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def make_shards(out: Path, shards: int = 2, per_shard: int = 16) -> Path:
    """32 distinct (image, caption) pairs as img2dataset-style webdataset shards + DALI indexes + manifest."""
    from pipeline.shards import write_shard_set
    names, samples = list(COLORS), []
    for i in range(shards * per_shard):
        color, shape = names[i % 4], SHAPES[i // 4 % 8]
        caption = f"a {color} {shape}"
        samples.append({"jpg": _image(COLORS[color], i // 4 % 8), "txt": caption,
                        "json": json.dumps({"photoid": i, "caption": caption, "title": caption,
                                            "description": f"{caption} on grey", "status": "success"})})
    return write_shard_set(out, samples, per_shard, name="tiny")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(args: list[str], timeout: int = 180) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), *RUN[1:], *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


def step_records(run_dir: Path) -> dict[int, dict]:
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in recs if "event" not in r}


def events(run_dir: Path, kind: str) -> list[dict]:
    recs = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r.get("event") == kind]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def ddp_run(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ddp")
    proc = torchrun([*COMMON, f"data.manifest={shards}", f"out_dir={out}", "debug.save_rank_params=true"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_ddp_run_finishes_in_sync_and_learns(ddp_run):
    recs = step_records(ddp_run)
    assert sorted(recs) == [s for s in range(1, STEPS + 1) if s != 3]     # step 3 was skipped
    for key in ("loss", "clip_loss", "ssl_loss", "lr", "logit_scale", "images_per_s", "data_wait",
                "step_time", "grad_norm", "samples_seen"):
        assert key in recs[1], key
    assert recs[STEPS]["samples_seen"] == STEPS * 16
    # MFU: both ranks' FLOPs per sample averaged, the text counted at the width it ran (8 tokens, not 77;
    # every caption here is that short, so the ranks agree; mixed widths: tests/test_text_padding.py)
    from trainer.flops import flops_per_sample
    from trainer.models import ModelConfig
    count = flops_per_sample(ModelConfig.preset("vit_tiny"), "slip")
    for s in (1, STEPS):
        per_sample = recs[s]["mfu"] * 1e12 * 2 / recs[s]["images_per_s"]
        assert per_sample == pytest.approx(count.train_at(8), rel=1e-3), (per_sample, count.train)
    assert 0 <= recs[5]["data_wait"] <= 1
    # ranks hold identical parameters after training
    p0 = torch.load(ddp_run / "rank0_params.pt")
    p1 = torch.load(ddp_run / "rank1_params.pt")
    assert p0.keys() == p1.keys()
    assert all(torch.equal(p0[k], p1[k]) for k in p0)
    # a tiny overfit run: the loss falls
    first = sum(recs[s]["loss"] for s in (1, 2, 4)) / 3
    last = sum(recs[s]["loss"] for s in range(STEPS - 2, STEPS + 1)) / 3
    assert last < 0.8 * first, (first, last)
    # checkpoints: the latest only (keep_every=0), loadable and complete
    from trainer import checkpoint as ckpt
    found = ckpt.list_checkpoints(ddp_run / "checkpoints")
    assert [s for s, _ in found] == [STEPS]
    state = ckpt.load_checkpoint(found[-1][1])
    assert state["step"] == STEPS and len(state["per_rank"]) == 2
    assert {"model", "optimizer", "scheduler", "samples_seen"} <= state.keys()
    assert {"rng", "loader"} <= state["per_rank"][1].keys()
    assert (ddp_run / "config.yaml").exists()
    assert "samples/s" in events(ddp_run, "summary")[0]["message"]


def test_nan_step_skipped_and_reported(ddp_run):
    nonfinite = events(ddp_run, "nonfinite")
    assert [e["step"] for e in nonfinite] == [3]
    assert "skipped" in nonfinite[0]["message"]
    assert "1 non-finite steps skipped" in events(ddp_run, "summary")[0]["message"]
    # the skipped step still advanced the schedule: step 4 runs at the rate of step index 3
    import math
    recs = step_records(ddp_run)
    warmup, peak, end = 2, 1e-3, 1e-5
    expected = end + 0.5 * (peak - end) * (1 + math.cos(math.pi * (3 - warmup) / (STEPS - warmup)))
    assert recs[4]["lr"] == pytest.approx(expected)


def test_sigkill_and_resume_matches_uninterrupted(ddp_run, shards, tmp_path):
    out = tmp_path / "killed"
    args = [*COMMON, f"data.manifest={shards}", f"out_dir={out}"]
    killed = torchrun([*args, "debug.sigkill_at_step=10"])   # every rank SIGKILLs itself after step 10
    assert killed.returncode != 0
    from trainer import checkpoint as ckpt
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [8]
    assert max(step_records(out)) >= 9        # it ran past the checkpoint before dying
    resumed = torchrun(args)                    # auto-resume: out_dir holds a checkpoint
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout and "step 8" in resumed.stdout
    ref, got = step_records(ddp_run), step_records(out)
    assert sorted(got) == sorted(ref)
    for step in sorted(ref):
        for key in ("loss", "clip_loss", "ssl_loss", "lr", "logit_scale"):
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-5, abs=1e-6), (step, key)


def test_damaged_latest_checkpoint_is_skipped_on_every_rank(ddp_run, shards, tmp_path):
    """4 KB of 0xFF in the middle of the latest checkpoint: rank 0 warns once and both ranks resume
    from the older one; the run then gives the uninterrupted run's losses."""
    out = tmp_path / "damaged"
    args = [*COMMON, f"data.manifest={shards}", f"out_dir={out}", "checkpoint.keep_every=4"]
    killed = torchrun([*args, "debug.sigkill_at_step=10"])
    assert killed.returncode != 0
    from trainer import checkpoint as ckpt
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [4, 8]
    latest = ckpt.checkpoint_path(out / "checkpoints", 8)
    with open(latest, "r+b") as f:
        f.seek(latest.stat().st_size // 2)
        f.write(b"\xff" * 4096)
    resumed = torchrun(args)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    warnings = [l for l in resumed.stderr.splitlines() if "warning:" in l]
    assert len(warnings) == 1 and f"{latest}: damaged checkpoint (record" in warnings[0]
    assert f"resumed from {ckpt.checkpoint_path(out / 'checkpoints', 4)} at step 4" in resumed.stdout
    ref, got = step_records(ddp_run), step_records(out)
    assert sorted(got) == sorted(ref)
    for step in sorted(ref):
        for key in ("loss", "clip_loss", "ssl_loss", "lr", "logit_scale"):
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-5, abs=1e-6), (step, key)
    for _, path in ckpt.list_checkpoints(out / "checkpoints"):
        ckpt.verify_checkpoint(path)       # step 8 was written again, whole


def test_repeated_nonfinite_stops_cleanly(shards, tmp_path):
    out = tmp_path / "nan"
    cmd = [*RUN, *COMMON, f"data.manifest={shards}", f"out_dir={out}", "data.batch_size=16",
           "checkpoint.every_steps=1", "debug.inject_nan_at_steps=[3,4,5]", "train.max_nonfinite=2",
           "optim.max_steps=8"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "2 non-finite steps in a row (last at step 4)" in proc.stderr
    from trainer import checkpoint as ckpt
    latest = ckpt.latest_checkpoint(out / "checkpoints")
    state = ckpt.load_checkpoint(latest)
    assert state["step"] == 3          # written before the run stopped at step 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_pillow_backend_trains(shards, tmp_path):
    """data.backend=pillow feeds the same trainer: a short single-process run learns and logs."""
    out = tmp_path / "pillow"
    cmd = [*RUN, *COMMON, f"data.manifest={shards}", f"out_dir={out}", "data.backend=pillow",
           "debug.inject_nan_at_steps=[]", "data.batch_size=16", "optim.max_steps=6", "optim.epochs=3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = step_records(out)
    assert sorted(recs) == list(range(1, 7)) and all(math.isfinite(r["loss"]) for r in recs.values())
    assert "backend: pillow" in (out / "config.yaml").read_text()


# ---------------------------------------------------------------- the loop in-process (no DDP, no data pipeline)

class _ListLoader:
    """Stands in for SLIPLoader: fixed batches, one epoch per pass, a position to checkpoint."""

    def __init__(self, batches: list[dict]):
        self.batches, self.steps_per_epoch, self.bad_samples, self.position = batches, len(batches), 0, 0

    def __iter__(self):
        while self.position < len(self.batches):
            self.position += 1
            yield self.batches[self.position - 1]
        self.position = 0

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def _in_process_trainer(out: Path, *overrides: str):
    from model_testing import random_batch
    from trainer.config import load_config
    from trainer.loop import Components, Trainer
    from trainer.models import build_model
    from trainer.objectives import build_objective
    from trainer.optim import WarmupCosine, build_optimizer
    cfg = load_config(None, ["model.preset=vit_tiny", "data.recipe.image_size=64", "objective.name=clip",
                             "data.recipe.num_ssl_views=0", "data.batch_size=4", "train.log_every=1",
                             "checkpoint.every_steps=0", f"out_dir={out}", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg.model, cfg.objective.name)
    opt = build_optimizer(model, cfg.optim)
    loader = _ListLoader([random_batch(4, seed=s) for s in range(2)])
    return Trainer(Components(cfg=cfg, model=model, train_model=model, objective=build_objective(cfg.objective),
                              optimizer=opt, scheduler=WarmupCosine(opt, cfg.optim.lr, 1, 4), loader=loader,
                              device=torch.device("cpu"), total_steps=4))


def test_save_works_before_fit(tmp_path):
    from trainer import checkpoint as ckpt
    trainer = _in_process_trainer(tmp_path, "debug.inject_nan_at_steps=[2]")
    trainer.save()
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [0]
    state = trainer.fit()
    assert state.step == 4 and state.nonfinite_total == 1 and state.checkpoints_written == 2
    assert sorted(step_records(tmp_path)) == [1, 3, 4]
    assert [e["step"] for e in events(tmp_path, "checkpoint")] == [0, 4]
    assert [e["step"] for e in events(tmp_path, "nonfinite")] == [2]
    assert "1 non-finite steps skipped" in events(tmp_path, "summary")[0]["message"]


def test_stop_signal_checkpoints_and_stops(tmp_path):
    import signal
    from trainer import checkpoint as ckpt
    trainer = _in_process_trainer(tmp_path)
    trainer.signals.received = signal.SIGTERM
    state = trainer.fit()
    assert state.step == 1
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path / "checkpoints")] == [1]
    assert "rerun the same command" in events(tmp_path, "stopped")[0]["message"]
