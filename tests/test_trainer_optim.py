"""AdamW groups (SPEC no-weight-decay rule) and the warmup + per-iteration cosine schedule."""

import pytest
import torch

from trainer.config import OptimConfig
from trainer.models import ModelConfig, build_model
from trainer.optim import WarmupCosine, build_optimizer, no_weight_decay


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


def test_warmup_then_cosine():
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    s = WarmupCosine(opt, base_lr=3e-3, warmup_steps=10, total_steps=110, start_lr=1e-6, end_lr=1e-5)
    lrs = []
    for _ in range(111):
        lrs.append(opt.param_groups[0]["lr"])
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
