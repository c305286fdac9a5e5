"""Finetuning end to end through tools/finetune.py (real processes): the reference recipe on a tiny
ViT, a pretrained tower loaded, validation each epoch, exact resume after SIGKILL, DDP with gloo."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from shard_testing import encode
from trainer.config import RunConfig, to_dict
from trainer.models import ModelConfig, build_model

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "trainer" / "configs" / "finetune_demo.yaml"


def _image(label: int, seed: int) -> np.ndarray:
    """A class you can see: a bright square in one of four quadrants, on noise."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 90, (48, 48, 3), dtype=np.uint8)
    y, x = divmod(label, 2)
    img[y * 24 + 4:y * 24 + 20, x * 24 + 4:x * 24 + 20] = 230
    return img


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune_data")
    for split, n in (("train", 24), ("val", 8)):
        for c in range(4):
            d = root / split / f"class{c}"
            d.mkdir(parents=True)
            for k in range(n):
                (d / f"{k:03d}.jpg").write_bytes(encode(_image(c, hash((split, c, k)) % 10_000)))
        (root / split / "class1" / "zz_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 cut off")
    return root


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    """A SLIP checkpoint in the trainer's format (random weights: what matters here is the plumbing)."""
    path = tmp_path_factory.mktemp("pretrained") / "step_00000010.pt"
    cfg = ModelConfig.preset("vit_tiny", vision_stem="conv", vision_ln_pre=True)   # finetune_demo.yaml's tower
    torch.manual_seed(0)
    run = RunConfig(model=cfg)
    run.objective.name = "slip"
    torch.save({"model": build_model(cfg, "slip").state_dict(), "config": to_dict(run), "step": 10}, path)
    return path


def finetune(args: list[str], timeout: int = 300, nproc: int = 1) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if nproc == 1:
        cmd = [sys.executable, "tools/finetune.py"]
    else:
        with socket.socket() as s:        # a free port for the rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_addr", "127.0.0.1", "--master_port", str(port), "tools/finetune.py"]
    return subprocess.run([*cmd, "--config", str(CONFIG), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def _common(labelled: Path, out: Path, *extra: str) -> list[str]:
    return [f"out_dir={out}", f"data.train={labelled / 'train'}", f"data.val={labelled / 'val'}",
            "data.batch_size=16", "optim.epochs=3", "optim.warmup_epochs=1", "train.log_every=1",
            "checkpoint.every_steps=3", "train.torch_threads=1", *extra]


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_finetuning_from_a_pretrained_tower_logs_what_the_issue_asks(labelled, pretrained, tmp_path):
    out = tmp_path / "ft"
    proc = finetune(["--checkpoint", str(pretrained), *_common(labelled, out)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"from checkpoint: {pretrained}" in proc.stdout
    records = _records(out)
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 18                              # 97 images / 16 = 6 steps an epoch, 3 epochs
    for key in ("loss", "cls_loss", "train_acc", "lr", "images_per_s", "data_wait"):
        assert all(key in r for r in steps), key
    evals = [r for r in records if "eval/val_top1" in r]
    assert [r["step"] for r in evals] == [6, 12, 18]     # once an epoch (the last one at the end)
    assert all(0 <= r["eval/val_top1"] <= 100 and r["eval/val_images"] == 32 for r in evals)
    assert all(r["eval/val_bad_images"] == 1 for r in evals)          # the broken one: counted, not fatal
    per_image = json.loads((out / "eval" / "val_step_00000018.json").read_text())["top1_by_image"]
    assert len(per_image) == 32 and set(per_image.values()) <= {0, 1}  # for a paired test between models
    assert 100 * sum(per_image.values()) / 32 == pytest.approx(evals[-1]["eval/val_top1"])
    # the schedule's peak is lr x global batch / 256 (lr_reference_batch), reached at the end of warm-up
    assert max(r["lr"] for r in steps) == pytest.approx(0.004 * 16 / 256, rel=1e-3)
    assert (out / "checkpoints" / "step_00000018.pt").exists()
    plotted = subprocess.run([sys.executable, "tools/plot_metrics.py", str(out / "metrics.jsonl")],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert plotted.returncode == 0, plotted.stderr
    assert (out / "plots" / "accuracy.png").exists()          # train top-1 and validation top-1 / top-5


def test_a_tower_of_another_size_is_a_one_line_config_error(labelled, pretrained, tmp_path):
    proc = finetune(["--checkpoint", str(pretrained), *_common(labelled, tmp_path / "x"), "model.vision_layers=2"])
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.vision_layers: checkpoint 4, config 2" in lines[0]


def test_a_pretraining_config_is_refused_by_the_finetuning_tool(tmp_path):
    proc = subprocess.run([sys.executable, "tools/finetune.py", "--config", "trainer/configs/demo_slip.yaml"],
                          capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 2 and "objective.name=classification" in proc.stderr


def test_resume_after_sigkill_gives_the_uninterrupted_losses(labelled, pretrained, tmp_path):
    args = ["--checkpoint", str(pretrained)]
    whole = finetune([*args, *_common(labelled, tmp_path / "whole", "optim.epochs=2")])
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = finetune([*args, *_common(labelled, tmp_path / "cut", "optim.epochs=2", "debug.sigkill_at_step=7")])
    assert killed.returncode == -9
    resumed = finetune([*args, *_common(labelled, tmp_path / "cut", "optim.epochs=2")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    loss = lambda out: {r["step"]: r["loss"] for r in _records(out) if "loss" in r}  # noqa: E731
    assert loss(tmp_path / "cut") == loss(tmp_path / "whole")


def test_the_training_benchmark_measures_finetuning_against_its_baseline(labelled):
    proc = subprocess.run([sys.executable, "tools/bench/bench_train.py", "--config", str(CONFIG),
                           f"data.train={labelled / 'train'}", "data.batch_size=8", "train.torch_threads=1",
                           "--steps", "1", "--rounds", "1", "--warmup", "1"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "vit_tiny classification: batch 8" in proc.stdout
    assert "(eager attention, fp32)" in proc.stdout and "speed-up ours/baseline:" in proc.stdout
    assert "end-to-end ours:" in proc.stdout and "data-wait" in proc.stdout and "0 bad samples" in proc.stdout


def test_finetuning_runs_on_two_ranks_with_gloo(labelled, pretrained, tmp_path):
    out = tmp_path / "ddp"
    proc = finetune(["--checkpoint", str(pretrained), *_common(labelled, out, "optim.epochs=1", "data.batch_size=8")],
                    nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 rank(s)" in proc.stdout
    records = _records(out)
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 6 and all(np.isfinite(r["loss"]) for r in steps)   # 97 images / (8 x 2 ranks)
    assert [r["step"] for r in records if "eval/val_top1" in r] == [6]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_finetuning_on_the_gpu_with_dali_bf16_and_compile(labelled, pretrained, tmp_path):
    """The GPU path: RandAugment on DALI's GPU graph, erasing and mixing on the device, bf16 autocast,
    torch.compile. The CPU tests above run the same logic with pillow or DALI on the CPU in fp32."""
    out = tmp_path / "gpu"
    proc = finetune(["--checkpoint", str(pretrained),
                     *_common(labelled, out, "data.backend=dali", "data.device=gpu", "train.precision=bf16",
                              "train.compile=true")], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = _records(out)
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 18 and all(np.isfinite(r["loss"]) for r in steps)
    evals = [r for r in records if "eval/val_top1" in r]
    assert [r["step"] for r in evals] == [6, 12, 18] and all(r["eval/val_images"] == 32 for r in evals)
