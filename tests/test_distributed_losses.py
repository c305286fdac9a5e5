"""Real 2-process gloo DDP vs one process on the whole batch: losses and gradients, every objective.

Convention under test (trainer/objectives.py): each rank's loss is a local mean (or a term equal on
all ranks), DDP averages gradients, collectives with gradient sum it over ranks in backward. Then
  mean over ranks of the loss == full-batch loss,   DDP gradient == full-batch gradient,
for CLIP's "gather_with_grad" and "global_logits" gradients. The two inexact CLIP gradients are
checked against what they are meant to compute: "local_chunk" is the full-batch gradient with each
half's columns from the other half held constant, "reference" the one with every column constant.
The model is a reduced tiny preset in float64 with ssl_norm="syncbn" (global BN statistics, so the two
halves normalise like the whole batch). One spawn serves all scenarios to keep the suite fast.
"""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from model_testing import random_batch
from trainer import distributed
from trainer.models import ModelConfig, build_model
from trainer.objectives import ObjectiveConfig, build_objective, clip_loss

WORLD = 2
LOCAL_BATCH = 4
# smaller than vit_tiny: float64 DDP all-reduces every gradient (the 49408-row embedding dominates)
CFG = ModelConfig.preset("vit_tiny", ssl_norm="syncbn", image_size=32, vision_width=32, vision_layers=2,
                         vision_heads=2, text_width=32, text_layers=2, text_heads=2, embed_dim=32,
                         ssl_mlp_dim=64, ssl_emb_dim=32, nclip_clusters=128, nclip_hidden_dim=64,
                         nclip_bottleneck_dim=16)
SCENARIOS = {
    "clip": ObjectiveConfig(name="clip"),                                   # gather_with_grad
    "clip_global_logits": ObjectiveConfig(name="clip", clip_gradient="global_logits"),
    "clip_local_chunk": ObjectiveConfig(name="clip", clip_gradient="local_chunk"),
    "clip_reference": ObjectiveConfig(name="clip", clip_gradient="reference"),
    "simclr": ObjectiveConfig(name="simclr"),
    "slip": ObjectiveConfig(name="slip", ssl_scale=0.7),
    "nclip": ObjectiveConfig(name="nclip"),
    "xclip": ObjectiveConfig(name="xclip", nclip_weight=0.5),
    "slip_local_chunk": ObjectiveConfig(name="slip", clip_gather_with_grad=False),   # the deprecated spelling
    # nCLIP's target makers: Sinkhorn's sums and the teacher centre run over the global batch
    "nclip_sinkhorn": ObjectiveConfig(name="nclip", nclip_targets="sinkhorn"),
    "xclip_centre": ObjectiveConfig(name="xclip", nclip_targets="centre", nclip_centre_momentum=0.5),
}


def objective_after_warm_up(scenario: str, model, batch):
    """The scenario's objective; with a teacher centre, one call first so the measured call uses a
    centre that came from the (global) batch."""
    objective = build_objective(SCENARIOS[scenario])
    if objective.centre is not None:
        with torch.no_grad():
            objective(model(batch))
    return objective


def fresh_model(scenario: str):
    torch.manual_seed(0)  # identical initial weights in every process
    return build_model(CFG, SCENARIOS[scenario].name).double()


def full_batch():
    return random_batch(WORLD * LOCAL_BATCH, image_size=CFG.image_size, seed=1, dtype=torch.float64)


def half(batch, rank):
    return {k: v[rank * LOCAL_BATCH:(rank + 1) * LOCAL_BATCH] for k, v in batch.items()}


def grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def worker(rank: int, port: int, out_dir: str):
    # rank 0 is started like torchrun, rank 1 like srun: both paths of init_distributed
    if rank == 0:
        env = {"RANK": "0", "WORLD_SIZE": str(WORLD), "LOCAL_RANK": "0"}
    else:
        env = {"SLURM_PROCID": "1", "SLURM_NTASKS": str(WORLD), "SLURM_LOCALID": "1"}
    os.environ.update(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    info = distributed.init_distributed()
    assert (info.rank, info.world_size, info.backend) == (rank, WORLD, "gloo")
    results = {"local_rank": info.local_rank}

    # the gather helpers themselves
    x = torch.full((2, 3), float(rank + 1), requires_grad=True)
    gathered = distributed.gather_with_grad(x)
    (gathered * torch.arange(4.0).view(4, 1)).sum().backward()  # each rank weights row i by i
    results["gather"] = distributed.gather_no_grad(x * 10), x.grad.clone()

    batch = half(full_batch(), rank)
    for name in SCENARIOS:
        model = DistributedDataParallel(fresh_model(name))
        objective = objective_after_warm_up(name, model.module, batch)
        losses = objective(model(batch))
        losses["loss"].backward()  # DDP averages the gradients over the two ranks
        results[name] = {"losses": {k: v.detach() for k, v in losses.items()}, "grads": grads(model.module),
                         "state": objective.state_dict()}
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    distributed.cleanup()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD)]


def clip_with_constant_remote_columns(out):
    """What DDP computes with the no-grad gather: each half's loss sees the other half as constants."""
    total = 0
    for r in range(WORLD):
        rows = slice(r * LOCAL_BATCH, (r + 1) * LOCAL_BATCH)
        mask = torch.zeros(WORLD * LOCAL_BATCH, 1, dtype=torch.float64)
        mask[rows] = 1
        cols = lambda x: mask * x + (1 - mask) * x.detach()  # noqa: E731  same values, grad only for own rows
        image, text = cols(out["image_embed"]), cols(out["text_embed"])
        # local rows vs global columns; labels offset by the rank
        img = torch.nn.functional.normalize(out["image_embed"][rows], dim=-1)
        txt = torch.nn.functional.normalize(out["text_embed"][rows], dim=-1)
        scale = out["logit_scale"]
        labels = torch.arange(LOCAL_BATCH) + r * LOCAL_BATCH
        li = scale * img @ torch.nn.functional.normalize(text, dim=-1).t()
        lt = scale * txt @ torch.nn.functional.normalize(image, dim=-1).t()
        ce = torch.nn.functional.cross_entropy
        total = total + (ce(li, labels) + ce(lt, labels)) / 2
    return total / WORLD


def clip_with_constant_columns(out):
    """The reference's gradient: every gathered column detached, only the rows differentiable."""
    img = torch.nn.functional.normalize(out["image_embed"], dim=-1)
    txt = torch.nn.functional.normalize(out["text_embed"], dim=-1)
    scale, labels = out["logit_scale"], torch.arange(WORLD * LOCAL_BATCH)
    ce = torch.nn.functional.cross_entropy
    return (ce(scale * img @ txt.detach().t(), labels) + ce(scale * txt @ img.detach().t(), labels)) / 2


def test_init_from_env_and_gather_helpers(ranks):
    assert [r["local_rank"] for r in ranks] == [0, 1]
    for rank, r in enumerate(ranks):
        values, grad = r["gather"]
        torch.testing.assert_close(values, torch.tensor([10.0] * 6 + [20.0] * 6).view(4, 3))
        # d/dx of sum over BOTH ranks' losses: rows (2r, 2r+1) weighted by their index, times 2 ranks
        expected = 2 * torch.tensor([2 * rank, 2 * rank + 1.0]).view(2, 1).expand(2, 3)
        torch.testing.assert_close(grad, expected)


def test_single_process_has_no_group():
    info = distributed.init_distributed()
    assert (info.rank, info.world_size, info.is_distributed) == (0, 1, False)
    x = torch.ones(2, requires_grad=True)
    assert distributed.gather_with_grad(x) is x


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_two_ranks_equal_one_process(ranks, scenario):
    model = fresh_model(scenario)
    objective_cfg = SCENARIOS[scenario]
    objective = objective_after_warm_up(scenario, model, full_batch())
    out = model(full_batch())
    full = objective(out)
    loss = full["loss"]
    mode = objective_cfg.clip_gradient if objective_cfg.name in ("clip", "slip", "xclip") else None
    if mode in ("local_chunk", "reference"):
        # same loss value, but the gradient treats (some of) the columns as constants
        clip_term = clip_loss(out["image_embed"], out["text_embed"], out["logit_scale"])["clip_loss"]
        inexact = (clip_with_constant_remote_columns(out) if mode == "local_chunk"
                   else clip_with_constant_columns(out))
        ddp_equivalent = loss - clip_term + inexact
        torch.testing.assert_close(ddp_equivalent, loss)
        loss = ddp_equivalent
    loss.backward()
    expected = grads(model)

    for key in ("loss", *[k for k in full if k.endswith("_loss")]):
        mean = sum(r[scenario]["losses"][key] for r in ranks) / WORLD
        torch.testing.assert_close(mean, full[key], rtol=1e-10, atol=1e-12, msg=f"{scenario} {key}")
    for r in ranks:   # the centre: the same on both ranks, and that of the whole batch
        for mod, centre in objective.state_dict().get("nclip_centre", {}).items():
            torch.testing.assert_close(r[scenario]["state"]["nclip_centre"][mod], centre, rtol=1e-10, atol=1e-12)
    for r in ranks:
        got = r[scenario]["grads"]
        for name, g in expected.items():
            torch.testing.assert_close(got[name], g, rtol=1e-8, atol=1e-12, msg=f"{scenario} {name}")


def test_inexact_clip_gradients_really_differ_from_full_gradient(ranks):
    """Guards the test above: the two inexact modes are not the full-batch gradient, the exact ones are."""
    model = fresh_model("clip")
    out = model(full_batch())
    clip_loss(out["image_embed"], out["text_embed"], out["logit_scale"])["clip_loss"].backward()
    full = grads(model)["text_projection"]
    for inexact in ("clip_local_chunk", "clip_reference"):
        assert not torch.allclose(full, ranks[0][inexact]["grads"]["text_projection"], rtol=1e-3), inexact
    for exact in ("clip", "clip_global_logits"):
        torch.testing.assert_close(ranks[0][exact]["grads"]["text_projection"], full)


def test_deprecated_spelling_maps_to_the_modes():
    assert ObjectiveConfig(clip_gather_with_grad=True).clip_gradient == "gather_with_grad"
    assert ObjectiveConfig(clip_gather_with_grad=False).clip_gradient == "local_chunk"
    assert ObjectiveConfig().clip_gradient == "gather_with_grad"
