"""nCLIP collapse monitoring (docs/NCLIP.md): the objective's histograms, the meter that sums them on
the device and all-reduces them at log steps, the once-per-modality warning, and a real 2-rank gloo
run whose logged cluster counts are those of the global batch (the union of the ranks' clusters)."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from test_trainer import COMMON, events, make_shards, step_records, torchrun
from trainer.metrics import ClusterUsageMeter
from trainer.models import ModelConfig
from trainer.objectives import CLUSTER_COUNTS, ObjectiveConfig, nclip_loss
from trainer.policies import CollapseWatch, UniformWatch

ROOT = Path(__file__).resolve().parents[1]


def test_loss_reports_histograms_and_entropies_per_modality():
    g = torch.Generator().manual_seed(0)
    li, lt = (torch.rand(12, 20, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(2))
    out = nclip_loss(li, lt)
    for mod, logits in (("image", li), ("text", lt)):
        counts = out[CLUSTER_COUNTS[mod]]
        assert counts.dtype == torch.int64 and counts.shape == (20,)
        assert torch.equal(counts, torch.bincount(logits.argmax(-1), minlength=20))
        p = torch.softmax(logits / 0.1, -1)
        sample = -(p * p.log()).sum(-1).mean()
        mean = p.mean(0)
        torch.testing.assert_close(out[f"nclip_{mod}_sample_entropy"], sample)
        torch.testing.assert_close(out[f"nclip_{mod}_batch_entropy"], -(mean * mean.log()).sum())
    torch.testing.assert_close(out["nclip_sharpness"],
                               (out["nclip_image_sample_entropy"] + out["nclip_text_sample_entropy"]) / 2)
    torch.testing.assert_close(out["nclip_batch_entropy"],
                               (out["nclip_image_batch_entropy"] + out["nclip_text_batch_entropy"]) / 2)


def _counts(*clusters: int, k: int = 8) -> torch.Tensor:
    return torch.bincount(torch.tensor(clusters), minlength=k)


def test_meter_sums_micro_batches_and_the_window():
    meter = ClusterUsageMeter(CLUSTER_COUNTS)
    assert meter.read(1) == {}                        # no nCLIP: nothing logged, nothing reduced
    image, text = CLUSTER_COUNTS["image"], CLUSTER_COUNTS["text"]
    meter.start_step()
    meter.add({image: _counts(0, 0, 1), text: _counts(5, 5, 5), "loss": torch.tensor(1.0)})
    meter.start_step()
    meter.add({image: _counts(2, 2), text: _counts(5, 6)})   # two micro-batches of one step
    meter.add({image: _counts(3, 2), text: _counts(5, 5)})
    got = meter.read(1)
    assert got["image"] == {"clusters_batch": 2, "clusters_window": 4, "samples_batch": 4, "k": 8}
    assert got["text"] == {"clusters_batch": 2, "clusters_window": 2, "samples_batch": 4, "k": 8}
    meter.start_step()
    meter.add({image: _counts(7), text: _counts(7)})
    assert meter.read(1)["image"]["clusters_window"] == 1    # the window restarts after a read


def test_collapse_watch_uses_min_of_k_and_batch_and_warns_once_per_fall():
    watch = CollapseWatch(0.1)
    # K = 65536, global batch 4096: 300 clusters is 7% of the batch (0.5% of K would mean nothing)
    usage = {"image": {"clusters_batch": 300, "samples_batch": 4096, "k": 65536},
             "text": {"clusters_batch": 3000, "samples_batch": 4096, "k": 65536}}
    found = watch.check(usage)
    assert [(m, round(f, 4)) for m, _, f in found] == [("image", round(300 / 4096, 4))]
    assert "300 used" in found[0][1] and "nclip_min_usage" in found[0][1]
    assert watch.check(usage) == []                   # once per modality
    # back above the bar but under twice it (hovering): still quiet when it dips again
    assert watch.check({"image": {**usage["image"], "clusters_batch": 600}}) == []
    assert watch.check(usage) == []
    # recovered to twice the bar (820 = 20%), then a new fall: a new warning (a fresh start that is
    # low, recovers and collapses later must not have spent its warning on the start)
    assert watch.check({"image": {**usage["image"], "clusters_batch": 820}}) == []
    assert [m for m, _, _ in watch.check(usage)] == ["image"]
    # K below the batch: the bound is K (60 of 512 is 11.7%, 40 is 7.8%)
    assert CollapseWatch(0.1).check({"text": {"clusters_batch": 60, "samples_batch": 4096, "k": 512}}) == []
    assert len(CollapseWatch(0.1).check({"text": {"clusters_batch": 40, "samples_batch": 4096, "k": 512}})) == 1
    assert CollapseWatch(0.0).check(usage) == []       # 0 turns it off
    with pytest.raises(ValueError, match="nclip_min_usage"):
        ObjectiveConfig(name="nclip", nclip_min_usage=1.5)


def test_uniform_watch_measures_the_gap_to_ln_k_and_warns_once_per_fall():
    k = {"image": 1024, "text": 1024}
    watch = UniformWatch(0.02)
    flat, healthy = math.log(1024) - 0.005, math.log(1024) - 0.5
    found = watch.check({"image": flat, "text": healthy}, k)
    assert [(m, round(kl, 6)) for m, _, kl in found] == [("image", 0.005)]
    assert "near-uniform" in found[0][1] and "nclip_min_kl" in found[0][1]
    assert watch.check({"image": flat, "text": healthy}, k) == []          # once per modality
    assert watch.check({"image": math.log(1024) - 0.03}, k) == []             # above the bar, under twice it
    assert watch.check({"image": flat}, k) == []
    assert watch.check({"image": math.log(1024) - 0.039}, k) == []            # just under twice the bar
    assert watch.check({"image": flat}, k) == []
    assert watch.check({"image": math.log(1024) - 0.041}, k) == []            # past twice the bar: re-armed
    assert [m for m, _, _ in watch.check({"image": flat}, k)] == ["image"]
    # the bar is in nats below ln K, whatever K: 0.015 below ln 32768 warns, 0.025 below does not
    assert len(UniformWatch(0.02).check({"text": math.log(32768) - 0.015}, {"text": 32768})) == 1
    assert UniformWatch(0.02).check({"text": math.log(32768) - 0.025}, {"text": 32768}) == []
    assert UniformWatch(0.0).check({"image": math.log(1024)}, k) == []      # 0 turns it off
    with pytest.raises(ValueError, match="nclip_min_kl"):
        ObjectiveConfig(name="nclip", nclip_min_kl=-1)


def test_fresh_heads_sit_well_above_the_uniform_bar():
    """The default bar must not fire on a healthy start: the vit_tiny and ViT-B/16 heads at initialisation
    give a mean KL(p || uniform) far above objective.nclip_min_kl on random features, and that KL is the
    one the docs derive: cosines of a d-dim bottleneck with random unit prototypes have variance 1/d,
    over the temperature tau that is 1/(d tau^2), and KL to uniform is about half the logit variance."""
    from trainer.models import NCLIPHead, Prototypes
    tau = ObjectiveConfig().nclip_student_temperature
    for preset in ("vit_tiny", "vit_b16"):
        cfg = ModelConfig.preset(preset)
        torch.manual_seed(0)
        head = NCLIPHead(cfg.vision_width, cfg.nclip_hidden_dim, cfg.nclip_bottleneck_dim)
        protos = Prototypes(cfg.nclip_bottleneck_dim, cfg.nclip_clusters)
        p = torch.softmax(protos(head(torch.randn(256, cfg.vision_width))) / tau, -1)
        kl = math.log(cfg.nclip_clusters) + (p * p.log()).sum(-1).mean().item()
        assert math.isclose(kl, 1 / (2 * cfg.nclip_bottleneck_dim * tau ** 2), rel_tol=0.1), (preset, kl)
        assert kl > 5 * ObjectiveConfig().nclip_min_kl, (preset, kl)


def _study_tool():
    spec = importlib.util.spec_from_file_location("nclip_collapse_study", ROOT / "tools/bench/nclip_collapse_study.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module          # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_learned_prototypes_let_outputs_go_uniform_and_fixed_ones_do_not(one_thread):
    """The mechanism behind nCLIP's near-uniform collapse (docs/NCLIP.md, sixth round): learned prototypes
    can give one bottleneck direction the same value in every prototype, and a sample mapped onto it
    scores every cluster alike. Held fixed (model.nclip_prototypes=fixed), random prototypes keep the
    spread of any sample's logits, and so its KL to uniform, above a floor."""
    min_kl = ObjectiveConfig().nclip_min_kl
    adversary = _study_tool().flattest_reachable       # through the model option, as the trainer builds it
    learned = adversary("vit_tiny", "learned")
    assert learned["kl"] < min_kl and learned["lambda_min"] < 1e-4, learned
    fixed = adversary("vit_tiny", "fixed")
    assert fixed["kl"] > 10 * min_kl, fixed
    # the prototypes were not moved: still random, lambda_min near (1 - sqrt(d / K))^2 / d = 0.0088
    assert fixed["lambda_min"] > 0.005, fixed


def test_fixed_prototypes_are_never_updated_and_still_saved():
    from trainer.models import build_model
    from trainer.optim import OptimConfig, build_optimizer
    cfg = ModelConfig.preset("vit_tiny", nclip_prototypes="fixed")
    model = build_model(cfg, "nclip")
    assert "prototypes.weight" in model.state_dict()
    opt = build_optimizer(model, OptimConfig())
    assert all(p is not model.prototypes.weight for g in opt.param_groups for p in g["params"])
    before = model.prototypes.weight.detach().clone()
    head = model.text_cluster_head.mlp[0].weight.detach().clone()
    logits = model.prototypes(model.text_cluster_head(torch.randn(8, cfg.text_width)))
    logits.logsumexp(-1).mean().backward()
    opt.step()
    assert torch.equal(model.prototypes.weight, before)
    assert not torch.equal(model.text_cluster_head.mlp[0].weight, head)
    with pytest.raises(ValueError, match="nclip_prototypes"):
        ModelConfig(nclip_prototypes="frozen")


# ----------------------------------------------------------------------------- a real 2-rank run

STEPS = 4
NCLIP_RUN = [a for a in COMMON if not a.startswith(("objective.name=", "optim.epochs=", "debug.", "checkpoint.",
                                                    "train.log_every="))]


# every sample its own cluster would be healthy; min_usage 1.0 makes the warning fire for sure. The
# teacher centre (objective state) makes the run the reference of the exact-resume test too.
NCLIP_ARGS = [*NCLIP_RUN, "objective.name=nclip", "data.recipe.num_ssl_views=0", "optim.epochs=2",
              "train.log_every=1", "checkpoint.every_steps=2", "checkpoint.keep_every=2",
              "objective.nclip_min_usage=1.0", "objective.nclip_min_kl=100",   # above ln K: fires for sure
              "objective.nclip_targets=centre"]


@pytest.fixture(scope="module")
def nclip_shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("shards"))


@pytest.fixture(scope="module")
def nclip_run(tmp_path_factory, nclip_shards):
    out = tmp_path_factory.mktemp("nclip")
    proc = torchrun([*NCLIP_ARGS, "train.log_every=2", f"data.manifest={nclip_shards}", f"out_dir={out}",
                     "debug.save_cluster_counts=true"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out


def test_logged_cluster_counts_are_global(nclip_run):
    recs = step_records(nclip_run)
    assert sorted(recs) == [2, 4]
    ranks = [torch.load(nclip_run / f"rank{r}_cluster_counts.pt") for r in range(2)]
    saw_different = False
    for step, rec in recs.items():
        for mod in ("image", "text"):
            for key in ("clusters_batch", "clusters_window", "batch_entropy", "sample_entropy"):
                assert math.isfinite(rec[f"nclip_{mod}_{key}"]), (step, mod, key)
            for which, key in ((0, "clusters_batch"), (1, "clusters_window")):
                own = [set(torch.nonzero(r[step][mod][which]).flatten().tolist()) for r in ranks]
                union = own[0] | own[1]
                assert rec[f"nclip_{mod}_{key}"] == len(union), (step, mod, key)
                if not (own[0] <= own[1] or own[1] <= own[0]):   # each rank has clusters the other lacks
                    saw_different = True      # counted on the summed histogram, never a per-rank figure
                    assert rec[f"nclip_{mod}_{key}"] > max(len(own[0]), len(own[1]))
            # the window holds the two steps of the logging window
            assert ranks[0][step][mod][1].sum() == 2 * 8 and ranks[0][step][mod][0].sum() == 8
    assert saw_different, "the two ranks saw the same clusters: the test would not tell union from mean"
    # the warning: once per modality, as an event in metrics.jsonl
    warned = events(nclip_run, "nclip_usage")
    assert sorted(e["modality"] for e in warned) == ["image", "text"]
    assert all(e["step"] == 2 and 0 <= e["fraction"] < 1 for e in warned)
    # the near-uniform warning reads the logged global sample entropy: KL = ln K - that entropy
    flat = events(nclip_run, "nclip_uniform")
    assert sorted(e["modality"] for e in flat) == ["image", "text"]
    for e in flat:
        logged = recs[2][f"nclip_{e['modality']}_sample_entropy"]
        ln_k = math.log(ModelConfig.preset("vit_tiny").nclip_clusters)
        assert e["step"] == 2 and math.isclose(e["kl"], ln_k - logged, rel_tol=1e-9, abs_tol=1e-9), e


def test_plot_metrics_draws_the_nclip_panels(nclip_run):
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "tools" / "plot_metrics.py"), str(nclip_run)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("nclip_clusters", "nclip_entropy"):
        assert (nclip_run / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_prototypes_train_by_default_and_stay_put_when_fixed(nclip_run, nclip_shards, tmp_path):
    """Through real DDP steps (2 ranks, gloo): the default run's prototypes move between its step-2 and
    step-4 checkpoints; with model.nclip_prototypes=fixed they stay bit-identical while the heads train."""
    from trainer import checkpoint as ckpt

    def weights(run):
        return [ckpt.load_checkpoint(ckpt.checkpoint_path(run / "checkpoints", s))["model"] for s in (2, 4)]

    step2, step4 = weights(nclip_run)
    assert not torch.equal(step2["prototypes.weight"], step4["prototypes.weight"])
    out = tmp_path / "fixed"
    proc = torchrun([*NCLIP_ARGS, "model.nclip_prototypes=fixed", f"data.manifest={nclip_shards}", f"out_dir={out}"])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "M of them fixed)" in proc.stdout
    step2, step4 = weights(out)
    assert torch.equal(step2["prototypes.weight"], step4["prototypes.weight"])
    assert not torch.equal(step2["text_cluster_head.mlp.0.weight"], step4["text_cluster_head.mlp.0.weight"])
    # switching on resume changes which parameters train: refused, and where a user allows it anyway,
    # a clear error instead of torch's group-size message
    from_learned = ckpt.checkpoint_path(nclip_run / "checkpoints", 2)
    switched = torchrun([*NCLIP_ARGS, "model.nclip_prototypes=fixed", f"data.manifest={nclip_shards}",
                         f"out_dir={tmp_path / 'switched'}", "--resume", str(from_learned),
                         "--allow-config-change", "model.nclip_prototypes"])
    assert switched.returncode != 0, switched.stdout[-2000:] + switched.stderr[-2000:]
    assert "model.nclip_prototypes" in switched.stderr and "model.init_from" in switched.stderr


def test_teacher_centre_is_checkpointed_and_resumes_exactly(nclip_run, nclip_shards, tmp_path):
    """A new run resumed from the reference run's step-2 checkpoint gives the same losses at step 4,
    which needs the all-reduced teacher centre from the checkpoint (a zero centre gives others)."""
    from trainer import checkpoint as ckpt
    step2 = ckpt.checkpoint_path(nclip_run / "checkpoints", 2)
    state = ckpt.load_checkpoint(step2)
    for mod in ("image", "text"):
        centre = state["objective"]["nclip_centre"][mod]
        assert centre.shape == (ModelConfig.preset("vit_tiny").nclip_clusters,)
        assert torch.isfinite(centre).all() and centre.abs().max() > 0
    out = tmp_path / "resumed"
    resumed = torchrun([*NCLIP_ARGS, "train.log_every=2", f"data.manifest={nclip_shards}", f"out_dir={out}",
                        "--resume", str(step2)])
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resumed from" in resumed.stdout
    ref, got = step_records(nclip_run), step_records(out)
    assert sorted(got) == [4]
    for key in ("loss", "nclip_pred", "nclip_image_sample_entropy"):
        assert got[4][key] == pytest.approx(ref[4][key], rel=1e-6, abs=1e-7), key
