"""AdamW groups (the reference's no-weight-decay rule, fine-tuning exclusions and layer-wise decay)
and the warmup + per-iteration cosine schedule."""
from functools import partial

import pytest
import torch

from trainer.config import OptimConfig
from trainer.models import ModelConfig, build_model
from trainer.objectives import PRETRAINING_OBJECTIVES as OBJECTIVES
from trainer.optim import WarmupCosine, build_optimizer, no_weight_decay, param_groups, vit_layer_id


def test_no_weight_decay_rule():
    model = build_model(ModelConfig.preset("vit_tiny"), "slip")
    opt = build_optimizer(model, OptimConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    for p in no_decay["params"]:
        n = names[id(p)]
        assert p.ndim < 2 or "bias" in n or "ln" in n or "bn" in n or "norm" in n, n
    for p in decay["params"]:
        assert p.ndim >= 2
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert any("logit_scale" == names[id(p)] for p in no_decay["params"])
    assert no_weight_decay("head.bn1.weight", torch.zeros(3, 3)) and not no_weight_decay("fc.weight", torch.zeros(3, 3))
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-8
    assert opt.defaults["foreach"] or opt.defaults["fused"]


def test_param_groups_exclude_biases_norms_and_scalars():
    model = build_model(ModelConfig.preset("vit_tiny", ssl_norm="bn"), "slip")
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    ids = lambda g: {id(p) for p in g["params"]}  # noqa: E731
    assert ids(decay) | ids(no_decay) == {id(p) for p in model.parameters()}
    assert not ids(decay) & ids(no_decay)
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay_names = {names[i] for i in ids(no_decay)}
    assert "logit_scale" in no_decay_names
    assert all(n.endswith("bias") or "norm" in n or "ln_" in n or ".net.1." in n or ".net.4." in n
               or n == "logit_scale" for n in no_decay_names)
    assert {"visual.pos_embed", "visual.cls_token", "image_projection"} <= {names[i] for i in ids(decay)}


@pytest.mark.parametrize("preset", ["vit_tiny", "vit_s16", "vit_b16", "vit_l16"])
@pytest.mark.parametrize("objective", OBJECTIVES)
def test_pretraining_groups_split_by_ndim(preset, objective):
    """On our models the name tokens add nothing to the ndim < 2 rule, and each group keeps the
    `named_parameters` order (AdamW's result depends on it)."""
    with torch.device("meta"):
        model = build_model(ModelConfig.preset(preset, ssl_norm="bn"), objective)
    decay, no_decay = param_groups(model, 0.1)
    params = list(model.parameters())
    assert decay["params"] == [p for p in params if p.ndim >= 2]
    assert no_decay["params"] == [p for p in params if p.ndim < 2]
    assert "lr_scale" not in decay and "lr_scale" not in no_decay


def test_layerwise_groups_with_extra_exclusions():
    model = build_model(ModelConfig.preset("vit_tiny"), "clip")
    layers, decay_rate = model.cfg.vision_layers, 0.75
    groups = param_groups(model, 0.05, extra_no_decay=("pos_embed", "cls_token"),
                          layer_id=partial(vit_layer_id, num_layers=layers), layer_decay=decay_rate,
                          num_layers=layers)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(names.values())           # every parameter exactly once
    seen = {}
    for g in groups:
        for p in g["params"]:
            n = names[id(p)]
            layer = vit_layer_id(n, layers)
            assert g["lr_scale"] == pytest.approx(decay_rate ** (layers + 1 - layer)), n
            exempt = p.ndim < 2 or n.endswith("bias") or n in ("visual.pos_embed", "visual.cls_token")
            assert g["weight_decay"] == (0.0 if exempt else 0.05), n
            seen[n] = layer
    assert seen["visual.cls_token"] == seen["visual.pos_embed"] == seen["visual.patch_embed.weight"] == 0
    assert seen["visual.transformer.blocks.0.attn.qkv.weight"] == 1
    assert seen[f"visual.transformer.blocks.{layers - 1}.mlp.0.weight"] == layers
    assert seen["image_projection"] == seen["visual.norm.weight"] == layers + 1
    # lowest layer first; inside a group the named_parameters order
    keys = [(vit_layer_id(names[id(g["params"][0])], layers), g["weight_decay"] == 0.0) for g in groups]
    assert keys == sorted(keys) and len(set(keys)) == len(keys)
    order = {n: i for i, n in enumerate(names.values())}
    for g in groups:
        idx = [order[names[id(p)]] for p in g["params"]]
        assert idx == sorted(idx)
    # the schedule runs each group at its scaled rate
    opt = build_optimizer(model, OptimConfig(lr=1e-3, weight_decay=0.05), extra_no_decay=("pos_embed", "cls_token"),
                          layer_id=partial(vit_layer_id, num_layers=layers), layer_decay=decay_rate,
                          num_layers=layers)
    sched = WarmupCosine(opt, base_lr=1e-3, warmup_steps=2, total_steps=10)
    for _ in range(4):
        sched.step()
        for g in opt.param_groups:
            assert g["lr"] == pytest.approx(sched.lr * g["lr_scale"])
    assert opt.param_groups[-1]["lr"] == sched.lr       # the head at the full rate
    with pytest.raises(ValueError, match="num_layers"):
        param_groups(model, 0.05, layer_id=partial(vit_layer_id, num_layers=layers))


def test_warmup_then_cosine():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = WarmupCosine(opt, base_lr=3e-3, warmup_steps=10, total_steps=110, start_lr=1e-6, end_lr=1e-5)
    lrs = []
    for _ in range(111):
        lrs.append(opt.param_groups[0]["lr"])
        assert s.lr == lrs[-1]
        s.step()
    assert lrs[0] == pytest.approx(1e-6)
    assert lrs[5] == pytest.approx(1e-6 + (3e-3 - 1e-6) * 0.5)
    assert lrs[10] == pytest.approx(3e-3)
    assert lrs[60] == pytest.approx(1e-5 + 0.5 * (3e-3 - 1e-5))   # half-way through the cosine
    assert lrs[110] == pytest.approx(1e-5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))         # monotone decay after warmup
    s2 = WarmupCosine(opt, 3e-3, 10, 110, 1e-6, 1e-5)
    s2.load_state_dict({"step_count": 37})
    assert opt.param_groups[0]["lr"] == pytest.approx(lrs[37])
