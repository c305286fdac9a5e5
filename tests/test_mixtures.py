"""Training on several manifests with upsampling factors: the per-source counts of an epoch, the
config, and a mixed run SIGKILLed at a step that resumes with the uninterrupted run's losses;
resuming with another set of manifests is refused naming the difference."""
from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest

from test_index_shards import indexed, lab_shards  # noqa: F401  (session fixtures: the indexed lab shards)
from test_resume_safety import BASE, error_lines, make_data, run
from test_trainer import step_records

from pipeline.mixture import Mixture
from trainer.config import ConfigError, load_config


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory.mktemp("tiny") / "shards")     # 32 samples, 2 shards


def test_weights_give_the_expected_counts_per_source():
    m = Mixture((24, 16, 5), (1.0, 0.5, 2.0))
    assert m.counts() == [24, 8, 10] and len(m) == 42
    halves = []
    for epoch in range(3):
        sources = m.source_of(idx := m.epoch_samples(seed=7, epoch=epoch))
        assert np.bincount(sources).tolist() == [24, 8, 10]
        assert sorted(idx[sources == 0]) == list(range(24))                       # weight 1: each once
        half = idx[sources == 1]
        assert len(set(half)) == 8 and set(half) <= set(range(24, 40))             # 0.5: a half, no repeats
        halves.append(tuple(sorted(half)))
        assert sorted(idx[sources == 2]) == sorted(list(range(40, 45)) * 2)       # 2: every sample twice
        assert (m.epoch_samples(seed=7, epoch=epoch) == idx).all()                # seeded
    assert len(set(halves)) == 3                                                  # a fresh half each epoch
    assert Mixture((10, 3), (0.55, 0.55)).counts() == [5, 2] and len(Mixture((10, 3), (0.55, 0.55))) == 7


def test_loader_epoch_counts_per_source(indexed, tiny):  # noqa: F811
    """Lab (28 usable samples, weight 1) + tiny (32, weight 0.5): 44 samples an epoch, handed out
    as 28 + 16 over its batches; one manifest alone keeps the single set's order."""
    from pipeline.loader import SLIPLoader
    from pipeline.manifest import load_manifest
    from pipeline.recipe import AugmentationRecipe
    from shard_testing import chars
    sources = [load_manifest(indexed["manifest"]), load_manifest(tiny)]
    recipe = AugmentationRecipe(image_size=32, num_ssl_views=0)
    loader = SLIPLoader(sources, recipe, 11, chars, num_threads=1, weights=[1, 0.5])     # DALI: it decodes WebP
    assert loader.num_samples == 44 and loader.steps_per_epoch == 4 and loader.source_names == ["lab", "tiny"]
    for _ in loader:
        pass
    assert loader.samples_by_source.tolist() == [28, 16] and loader.epoch == 1 and loader.bad_samples == 0
    order = loader.epoch_order(0)
    assert sorted(order[order < 28]) == list(range(28)) and len(set(order[order >= 28])) == 16
    alone = SLIPLoader(sources[:1], recipe, 4, chars, backend="pillow", num_threads=1)
    assert (alone.epoch_order(3) == np.random.default_rng([0, 3, 0x5EED]).permutation(28)).all()


def test_config_takes_a_list_and_checks_the_weights():
    cfg = load_config(None, ["data.manifest=[a.json,b.json]", "data.weights=[1,0.5]"])
    assert cfg.data.manifests == ["a.json", "b.json"] and cfg.data.weights == [1.0, 0.5]
    assert load_config(None, ["data.manifest=a.json"]).data.manifests == ["a.json"]
    with pytest.raises(ConfigError, match="weights: 1 given for 2 manifest"):
        load_config(None, ["data.manifest=[a.json,b.json]", "data.weights=[1]"])
    with pytest.raises(ConfigError, match="must all be > 0"):
        load_config(None, ["data.manifest=[a.json]", "data.weights=[0]"])


# 44 samples an epoch at batch 8: 5 steps an epoch; 8 steps, checkpoints at 4 and 8
MIXED = [*BASE, "optim.max_steps=8", "data.weights=[1,0.5]"]


@pytest.fixture(scope="module")
def mixed_reference(indexed, tiny, tmp_path_factory) -> Path:  # noqa: F811
    out = tmp_path_factory.mktemp("mixed") / "run"
    proc = run([*MIXED, f"data.manifest=[{indexed['manifest']},{tiny}]", f"out_dir={out}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_mixed_run_killed_resumes_with_the_uninterrupted_losses(mixed_reference, indexed, tiny,  # noqa: F811
                                                               tmp_path):
    sources = f"data.manifest=[{indexed['manifest']},{tiny}]"
    out = tmp_path / "run"
    first = run([*MIXED, sources, f"out_dir={out}", "debug.sigkill_at_step=6"])
    assert first.returncode == -signal.SIGKILL, first.stderr[-3000:]
    second = run([*MIXED, sources, f"out_dir={out}"])
    assert second.returncode == 0 and "resumed from" in second.stdout, second.stderr[-3000:]
    ref, got = step_records(mixed_reference), step_records(out)
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    for step in range(5, 9):
        for key in ("loss", "clip_loss", "ssl_loss", "lr"):
            assert got[step][key] == pytest.approx(ref[step][key], rel=1e-5, abs=1e-6), (step, key)
        assert got[step]["samples_seen/lab"] == ref[step]["samples_seen/lab"]
    assert ref[8]["samples_seen/lab"] + ref[8]["samples_seen/tiny"] == 64
    assert ref[5]["samples_seen/lab"] + ref[5]["samples_seen/tiny"] == 40
    # the saved config names every manifest with its checksum and weight
    head = (out / "config.yaml").read_text().splitlines()[:2]
    assert head[0].startswith(f"# data source: {indexed['manifest']} sha256 ") and head[1].endswith("weight 0.5")

    # another set of sources is refused, naming the difference
    other = make_data(tmp_path / "other", caption="one {color} {shape}")
    proc = run([*MIXED, f"data.manifest=[{indexed['manifest']},{other}]", f"out_dir={out}", "optim.max_steps=10"])
    assert proc.returncode == 2
    (line,) = error_lines(proc)
    assert "the training sources differ: missing now: manifest.json" in line and "new: manifest.json" in line
    proc = run([*MIXED, f"data.manifest=[{tiny},{indexed['manifest']}]", f"out_dir={out}", "optim.max_steps=10"])
    (line,) = error_lines(proc)
    assert proc.returncode == 2 and "in another order" in line


def test_two_ranks_count_every_source_together(indexed, tiny, tmp_path):  # noqa: F811
    """Under DDP each rank takes its slice of the mixed epoch; the per-source metric is the sum over ranks."""
    from test_trainer import torchrun
    out = tmp_path / "ddp"
    proc = torchrun([*MIXED, f"data.manifest=[{indexed['manifest']},{tiny}]", f"out_dir={out}", "optim.max_steps=2"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = step_records(out)
    assert recs[2]["samples_seen/lab"] + recs[2]["samples_seen/tiny"] == 2 * 2 * 8 == recs[2]["samples_seen"]
