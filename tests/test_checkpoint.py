"""Atomic checkpoints: an interrupted write keeps the previous checkpoint; pruning; validated loads."""
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from trainer import checkpoint as ckpt


def _state(value: float) -> dict:
    return {"model": {"w": torch.full((64, 64), value)}, "step": int(value),
            "per_rank": [{"rng": ckpt.rng_state(), "loader": {"epoch": np.int64(1), "ids": np.arange(3)}}]}


def test_save_load_weights_only(tmp_path):
    path = ckpt.save_checkpoint(_state(1.0), tmp_path, 1)
    loaded = ckpt.load_checkpoint(path)   # weights_only=True inside: numpy was converted
    assert loaded["step"] == 1 and torch.equal(loaded["model"]["w"], torch.ones(64, 64))
    assert loaded["per_rank"][0]["loader"]["epoch"] == 1
    assert torch.equal(loaded["per_rank"][0]["loader"]["ids"], torch.arange(3))


def test_interrupted_write_keeps_previous(tmp_path, monkeypatch):
    ckpt.save_checkpoint(_state(1.0), tmp_path, 1)
    real_save = torch.save

    def dying_save(obj, f, *a, **k):   # a crash half-way through writing the new file
        f.write(b"PK\x03\x04 partial bytes")
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(_state(2.0), tmp_path, 2)
    monkeypatch.setattr(torch, "save", real_save)
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000001.pt"
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001.pt"]  # no partial file left


def test_sigkilled_writer_leaves_previous_loadable(tmp_path):
    """A real process SIGKILLed while writing a large checkpoint: the old one stays intact."""
    ckpt.save_checkpoint(_state(1.0), tmp_path, 1)
    code = textwrap.dedent(f"""
        import os, signal, torch
        from trainer import checkpoint as ckpt
        real = os.replace
        def kill_before_rename(a, b):  # the tmp file is fully written and fsynced, not yet renamed
            os.kill(os.getpid(), signal.SIGKILL)
        os.replace = kill_before_rename
        ckpt.save_checkpoint({{"model": {{"w": torch.zeros(1000, 1000)}}, "step": 2}}, {str(tmp_path)!r}, 2)
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True)
    assert proc.returncode == -9
    assert ckpt.latest_checkpoint(tmp_path).name == "step_00000001.pt"
    assert ckpt.load_checkpoint(ckpt.latest_checkpoint(tmp_path))["step"] == 1
    # the orphaned temporary file is cleaned up by the next save
    ckpt.save_checkpoint(_state(3.0), tmp_path, 3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000003.pt"]


def test_truncated_file_is_a_clear_error(tmp_path):
    path = ckpt.save_checkpoint(_state(1.0), tmp_path, 1)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="unreadable checkpoint"):
        ckpt.load_checkpoint(path)


def test_keep_latest_and_every_nth(tmp_path):
    for step in range(1, 11):
        ckpt.save_checkpoint(_state(float(step)), tmp_path, step, keep_every=4)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [4, 8, 10]


def test_shape_mismatch_is_reported():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    state = model.state_dict()
    state["1.weight"] = torch.zeros(3, 8)
    del state["1.bias"]
    state["extra"] = torch.zeros(1)
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.check_model_state(model, state, "x.pt")
    msg = str(e.value)
    assert "1.weight: checkpoint (3, 8) vs model (2, 8)" in msg and "1.bias" in msg and "extra" in msg


def test_rng_round_trip():
    state = ckpt.to_safe(ckpt.rng_state())
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected
