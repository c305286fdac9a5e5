"""nCLIP's target makers (trainer/objectives.py `nclip_targets`, docs/NCLIP.md "Second
round"): Sinkhorn equipartition, DINO teacher centring and its exact resume, the config choice.
The 2-rank checks (global over ranks) are in tests/test_distributed_losses.py, the trainer's
checkpointed centre in tests/test_nclip_monitoring.py."""
from __future__ import annotations

import io

import pytest
import torch

from trainer.objectives import (ObjectiveConfig, TeacherCentre, build_objective, nclip_loss, nclip_targets,
                                sinkhorn_targets)


def _collapsing_logits(b: int = 64, k: int = 16, seed: int = 0) -> torch.Tensor:
    """Cosine-like logits where every sample prefers cluster 0 (the collapsed state), with a
    per-sample preference among the rest."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.rand(b, k, generator=g, dtype=torch.float64) * 0.4 - 0.2
    logits[:, 0] += 0.6
    return logits


def test_sinkhorn_targets_are_equipartitioned():
    logits = _collapsing_logits()
    b, k = logits.shape
    sharp = nclip_targets(logits, "image", 0.05, "sharpen")
    q = sinkhorn_targets(logits, 0.05, iterations=3)
    torch.testing.assert_close(q.sum(1), torch.ones(b, dtype=torch.float64))     # a distribution per sample
    # every cluster receives about B/K of the batch; the plain sharpened targets give cluster 0 nearly all
    assert (q.sum(0) / (b / k) - 1).abs().max() < 0.05
    assert sharp.sum(0)[0] > 0.9 * b
    assert q.argmax(1).unique().numel() >= k // 2        # the hard assignments are spread too
    # more iterations: closer to exact equipartition
    q10 = sinkhorn_targets(logits, 0.05, iterations=10)
    assert (q10.sum(0) / (b / k) - 1).abs().max() < (q.sum(0) / (b / k) - 1).abs().max()
    # a constant shift of the logits (the stabilising max) changes nothing
    torch.testing.assert_close(sinkhorn_targets(logits + 3.0, 0.05), q)


def test_centre_removes_the_shared_preference_and_follows_the_global_mean():
    logits = _collapsing_logits()
    centre = TeacherCentre(momentum=0.5)
    first = nclip_targets(logits, "image", 0.05, "centre", centre)
    torch.testing.assert_close(first, nclip_targets(logits, "image", 0.05, "sharpen"))   # centre starts at 0
    torch.testing.assert_close(centre.centres["image"], 0.5 * logits.mean(0))
    for _ in range(20):
        q = nclip_targets(logits, "image", 0.05, "centre", centre)
    torch.testing.assert_close(centre.centres["image"], logits.mean(0), rtol=1e-5, atol=1e-6)
    assert q.sum(0)[0] < 0.25 * logits.shape[0]          # cluster 0 no longer takes the batch
    assert "text" not in centre.centres                  # one centre per modality
    with pytest.raises(ValueError, match="TeacherCentre"):
        nclip_targets(logits, "image", 0.05, "centre", None)


def _batches(n: int = 5):
    g = torch.Generator().manual_seed(1)
    return [{"image_cluster_logits": torch.rand(8, 32, generator=g, dtype=torch.float64) * 2 - 1,
             "text_cluster_logits": torch.rand(8, 32, generator=g, dtype=torch.float64) * 2 - 1}
            for _ in range(n)]


def test_centre_state_resumes_exactly():
    cfg = ObjectiveConfig(name="nclip", nclip_targets="centre")
    batches = _batches()
    straight = build_objective(cfg)
    losses = [straight(b)["loss"] for b in batches]
    interrupted = build_objective(cfg)
    for b in batches[:3]:
        interrupted(b)
    buf = io.BytesIO()
    torch.save(interrupted.state_dict(), buf)          # as a checkpoint holds it
    buf.seek(0)
    resumed = build_objective(cfg)
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    assert torch.equal(resumed.state_dict()["nclip_centre"]["text"], interrupted.state_dict()["nclip_centre"]["text"])
    for b, expected in zip(batches[3:], losses[3:]):
        assert torch.equal(resumed(b)["loss"], expected)
    # without the state the losses differ: the test can tell
    fresh = build_objective(cfg)
    assert not torch.equal(fresh(batches[3])["loss"], losses[3])
    # objectives without state have none
    assert build_objective(ObjectiveConfig(name="nclip")).state_dict() == {}


def test_loss_uses_the_chosen_targets():
    li, lt = _collapsing_logits(seed=1), _collapsing_logits(seed=2)
    base = nclip_loss(li, lt, 0.1, 0.05, 0.0, 0.0)
    sink = nclip_loss(li, lt, 0.1, 0.05, 0.0, 0.0, targets="sinkhorn")
    q_text = sinkhorn_targets(lt, 0.05)
    q_image = sinkhorn_targets(li, 0.05)
    lp_i, lp_t = torch.log_softmax(li / 0.1, -1), torch.log_softmax(lt / 0.1, -1)
    expected = (-(q_text * lp_i).sum(-1).mean() - (q_image * lp_t).sum(-1).mean()) / 2
    torch.testing.assert_close(sink["nclip_pred"], expected)
    assert not torch.allclose(base["nclip_pred"], sink["nclip_pred"])


@pytest.mark.parametrize("field, value, message", [
    ("nclip_targets", "dino", "nclip_targets 'dino': choose one of"),
    ("nclip_centre_momentum", 1.0, "nclip_centre_momentum must be in"),
    ("nclip_sinkhorn_iterations", 0, "nclip_sinkhorn_iterations must be >= 1"),
])
def test_bad_target_config_is_one_clear_error(field, value, message):
    with pytest.raises(ValueError, match=message):
        ObjectiveConfig(name="nclip", **{field: value})
