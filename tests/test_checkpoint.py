"""Atomic checkpoints: an interrupted write keeps the previous checkpoint; pruning; validated loads."""
import random
from pathlib import Path
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


def test_ignored_prefixes_are_not_compared():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Linear(8, 2))
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("1.")}
    ckpt.check_model_state(model, state, "x.pt", ignore=("1.",))
    with pytest.raises(ckpt.CheckpointError, match="missing in checkpoint"):
        ckpt.check_model_state(model, state, "x.pt")


TINY_RUN = ["model.preset=vit_tiny", "objective.name=slip", "data.recipe.image_size=64"]


def _tiny_run(tmp_path, stored_config: bool, wrap: str = ""):
    """A checkpoint of a tiny SLIP model in <tmp>/run/checkpoints, config.yaml in <tmp>/run."""
    from trainer.config import load_config, save_config, to_dict
    from trainer.models import build_model
    cfg = load_config(None, TINY_RUN + [f"out_dir={tmp_path / 'run'}"])
    torch.manual_seed(1)
    model = build_model(cfg.model, cfg.objective.name)
    state = {"model": {wrap + k: v for k, v in model.state_dict().items()}, "step": 2}
    if stored_config:
        state["config"] = to_dict(cfg)
    path = ckpt.save_checkpoint(state, tmp_path / "run" / "checkpoints", 2)
    save_config(cfg, tmp_path / "run" / "config.yaml")
    return path, model, cfg


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Equal weights outside the SimCLR head (which load_model does not load)."""
    sa, sb = ({k: v for k, v in m.state_dict().items() if not k.startswith("ssl_head.")} for m in (a, b))
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_load_model_from_the_stored_config(tmp_path):
    path, model, cfg = _tiny_run(tmp_path, stored_config=True, wrap="module._orig_mod.")
    (tmp_path / "run" / "config.yaml").write_text("model: {preset: vit_tiny, vision_width: 64}\n")  # not read
    loaded, run_cfg = ckpt.load_model(path)
    assert run_cfg == cfg and not loaded.training
    assert _same_weights(loaded, model)      # DDP / torch.compile prefixes stripped


def test_load_model_from_config_yaml_or_an_explicit_config(tmp_path):
    path, model, cfg = _tiny_run(tmp_path, stored_config=False)
    loaded, run_cfg = ckpt.load_model(path)
    assert run_cfg == cfg and _same_weights(loaded, model)
    (tmp_path / "wide.yaml").write_text("model: {preset: vit_tiny, vision_width: 64}\nobjective: {name: slip}\n"
                                        "data: {recipe: {image_size: 64}}\n")
    with pytest.raises(ckpt.CheckpointError, match="does not match the model"):
        ckpt.load_model(path, tmp_path / "wide.yaml")
    (tmp_path / "run" / "config.yaml").unlink()
    with pytest.raises(FileNotFoundError, match="no run configuration"):
        ckpt.load_model(path)


def test_load_model_leaves_out_the_ssl_head(tmp_path):
    """The SimCLR head is a training-only part: absent or of another norm kind, the model still loads."""
    path, model, cfg = _tiny_run(tmp_path, stored_config=True)
    state = ckpt.load_checkpoint(path)
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("ssl_head.")}
    state["model"]["ssl_head.1.running_var"] = torch.ones(7)     # as a head of another norm kind
    torch.save(state, path)
    loaded, _ = ckpt.load_model(path)
    assert _same_weights(loaded, model)


def test_a_text_only_load_has_no_image_side_and_the_same_text_tower(tmp_path):
    """Textual evaluation loads the text side alone: no image-side module exists, the text embeddings
    equal the whole model's, and a text tower of another shape is still refused."""
    from trainer.models import IMAGE_SIDE
    path, model, cfg = _tiny_run(tmp_path, stored_config=True)
    text, _ = ckpt.load_model(path, text_only=True)
    assert text.visual is None and not [k for k in text.state_dict() if k.startswith(IMAGE_SIDE)]
    tokens = torch.randint(1, 400, (3, cfg.model.context_length))
    with torch.no_grad():
        assert torch.equal(text.encode_text(tokens), model.eval().encode_text(tokens))
    state = ckpt.load_checkpoint(path)
    state["model"]["text_projection"] = torch.zeros(3, 3)
    torch.save(state, path)
    with pytest.raises(ckpt.CheckpointError, match="text_projection"):
        ckpt.load_model(path, text_only=True)


def test_rng_round_trip():
    state = ckpt.to_safe(ckpt.rng_state())
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    ckpt.set_rng_state(state)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


# ---------------------------------------------------------------- verification (CRC-32 per record)

def _damage(path) -> None:
    """4 KB of 0xFF written into the middle of the file, in place (same size)."""
    with open(path, "r+b") as f:
        f.seek(path.stat().st_size // 2)
        f.write(b"\xff" * 4096)


def test_damaged_checkpoint_is_refused_on_every_load(tmp_path):
    path, model, cfg = _tiny_run(tmp_path, stored_config=True)
    size = path.stat().st_size
    _damage(path)
    assert path.stat().st_size == size
    torch.load(path, weights_only=True)     # torch itself loads it: the damage would go unnoticed
    with pytest.raises(ckpt.CheckpointError, match=r"damaged checkpoint \(record .* fails its CRC-32 check\)"):
        ckpt.load_checkpoint(path)
    with pytest.raises(ckpt.CheckpointError, match="damaged checkpoint") as e:
        ckpt.load_model(path)                # evaluation and imported checkpoints go through the same check
    assert "\n" not in str(e.value) and str(path) in str(e.value)


def test_nonfinite_weights_are_never_written(tmp_path):
    ckpt.save_checkpoint(_state(1.0), tmp_path, 1)
    with pytest.raises(ckpt.CheckpointError, match="weights at step 2 are not finite; checkpoint not written"):
        ckpt.save_checkpoint({**_state(2.0), "model": {"w": torch.full((64, 64), float("nan"))}}, tmp_path, 2)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]


def test_write_damaged_on_its_way_to_disk_keeps_the_older_checkpoints(tmp_path, monkeypatch):
    """The storage corrupts the new file (damaged between writing and renaming): the write is
    verified before anything is pruned, so the newest good checkpoint survives."""
    import os
    ckpt.save_checkpoint(_state(1.0), tmp_path, 1)
    real_replace = os.replace

    def damaging_replace(src, dst):
        _damage(Path(src))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", damaging_replace)
    with pytest.raises(ckpt.CheckpointError, match="step_00000002.pt: damaged checkpoint .* right after writing it"):
        ckpt.save_checkpoint(_state(2.0), tmp_path, 2)
    monkeypatch.setattr(os, "replace", real_replace)
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [1]
    assert ckpt.load_checkpoint(tmp_path / "step_00000001.pt")["step"] == 1


def test_full_disk_is_one_line_naming_the_directory(tmp_path):
    """The temporary file is a link to /dev/full: every write to it fails with ENOSPC."""
    import os
    ckpt.save_checkpoint(_state(1.0), tmp_path, 1)
    os.symlink("/dev/full", tmp_path / f".step_00000002.pt.tmp{os.getpid()}")
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.save_checkpoint(_state(2.0), tmp_path, 2)
    msg = str(e.value)
    assert "\n" not in msg and "No space left on device" in msg and str(tmp_path) in msg
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000001.pt"]   # link removed, old one kept


class _RunsCode:
    """Unpickling this would run a shell command (what a hostile checkpoint does)."""
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_runs_code_is_refused_in_one_line(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "step_00000001.pt"
    torch.save({"model": {}, "payload": _RunsCode(marker)}, path)
    from trainer import checkpoint as ckpt
    with pytest.raises(ckpt.CheckpointError) as e:
        ckpt.load_checkpoint(path)
    message = str(e.value)
    assert "refused to load" in message and "system" in message and "\n" not in message
    assert "weights_only" not in message          # never advise switching the protection off
    assert not marker.exists()


def test_init_from_verifies_like_load_model(tmp_path):
    """model.init_from reads our checkpoints through the same checks: CRC and finite weights."""
    from trainer.config import load_config, to_dict
    from trainer.convert import ConversionError, init_from
    from trainer.models import build_model
    cfg = load_config(None, ["model.preset=vit_tiny", "data.recipe.image_size=64", "objective.name=clip",
                             "data.recipe.num_ssl_views=0"])
    model = build_model(cfg.model, "clip")
    state = {k: v.clone() for k, v in model.state_dict().items()}
    next(v for v in state.values() if v.is_floating_point()).fill_(float("nan"))
    path = tmp_path / "nan.pt"
    torch.save({"model": state, "config": to_dict(cfg), "step": 1}, path)
    with pytest.raises(ConversionError, match="not finite"):
        init_from(build_model(cfg.model, "clip"), path)
    good = tmp_path / "good.pt"
    torch.save({"model": model.state_dict(), "config": to_dict(cfg), "step": 1}, good)
    raw = bytearray(good.read_bytes())
    raw[len(raw) // 2: len(raw) // 2 + 4096] = b"\xff" * 4096
    good.write_bytes(bytes(raw))
    with pytest.raises(ConversionError, match="CRC|unreadable|damaged"):
        init_from(build_model(cfg.model, "clip"), good)
