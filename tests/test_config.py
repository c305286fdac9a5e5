"""RunConfig: YAML + overrides, type checking with file:line errors, round trip through config.yaml."""
from pathlib import Path

import pytest

from trainer.config import ConfigError, RunConfig, load_config, parse_override, save_config

CONFIGS = sorted((Path(__file__).parents[1] / "trainer" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_load(path):
    cfg = load_config(path)
    assert isinstance(cfg, RunConfig)
    assert cfg.model.image_size == cfg.data.recipe.image_size
    # pretraining: the SLIP reference's AdamW; finetuning: BEiT's
    betas = (0.9, 0.999) if cfg.objective.name == "classification" else (0.9, 0.98)
    assert cfg.optim.betas == betas and cfg.optim.eps == 1e-8


def test_reference_hyperparameters():
    d = Path(__file__).parents[1] / "trainer" / "configs"
    slip, clip, simclr = (load_config(d / f"{o}_vit_b16.yaml") for o in ("slip", "clip", "simclr"))
    assert (slip.optim.lr, slip.optim.weight_decay) == (3e-3, 0.1)
    assert (clip.optim.lr, clip.optim.weight_decay) == (5e-4, 0.5)
    assert (simclr.optim.lr, simclr.objective.ssl_temperature) == (3.2e-3, 0.1)
    assert slip.model.vision_width == 768 and slip.data.batch_size * 64 == 4096
    assert load_config(d / "slip_vit_s16.yaml").model.vision_heads == 12


@pytest.mark.parametrize("size, epochs, warmup, decay, drop_path", [
    ("s16", 100, 20, 0.65, 0.0), ("b16", 100, 20, 0.65, 0.1), ("l16", 50, 5, 0.75, 0.1)])
def test_finetuning_configs_are_the_reference_recipe(size, epochs, warmup, decay, drop_path):
    cfg = load_config(Path(__file__).parents[1] / "trainer" / "configs" / f"finetune_vit_{size}.yaml")
    o, r = cfg.optim, cfg.data.recipe
    assert (o.epochs, o.warmup_epochs, cfg.finetune.layer_decay, cfg.model.drop_path) == (epochs, warmup, decay,
                                                                                            drop_path)
    assert (o.lr, o.lr_reference_batch, o.weight_decay, o.min_lr, o.warmup_start_lr) == (4e-3, 256, 0.05, 1e-6, 1e-6)
    assert cfg.data.batch_size * 8 == 1024 and cfg.finetune.no_weight_decay == ("pos_embed", "cls_token")
    assert (r.clip_scale, r.clip_flip_prob, r.interpolation, r.eval_resize) == ((0.08, 1.0), 0.5, "bicubic", 256)
    ra, mix = r.rand_augment, r.mix
    assert (ra.num_ops, ra.prob, ra.magnitude, ra.magnitude_std) == (2, 0.5, 9.0, 0.5)
    assert (mix.mixup_alpha, mix.cutmix_alpha, mix.prob, mix.switch_prob) == (0.8, 1.0, 1.0, 0.5)
    assert (mix.label_smoothing, mix.erasing_prob) == (0.1, 0.25)


def test_overrides_are_typed(tmp_path):
    cfg = load_config(None, ["optim.lr=1e-3", "optim.betas=[0.8, 0.9]", "train.compile=true",
                             "optim.grad_clip=null", "model.preset=vit_tiny", "data.recipe.image_size=64",
                             "optim.epochs=2"])
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.epochs, float)
    assert cfg.optim.betas == (0.8, 0.9) and cfg.train.compile is True and cfg.optim.grad_clip is None
    assert cfg.model.vision_width == 128  # the preset's values


@pytest.mark.parametrize("override, message", [
    ("optim.lr=fast", "optim.lr: expected a number"),
    ("optim.lrr=1", "did you mean 'lr'"),
    ("train.precision=fp8", "expected one of"),
    ("data.batch_size=1.5", "expected an integer"),
    ("optim.betas=[0.9]", "expected 2 values"),
    ("train.compile=1", "expected true/false"),
    ("noequals", "expected key.sub=value"),
    ("model.preset=vit_huge", "unknown model preset"),
    ("data.caption_mode=sometimes", "data.caption_mode: expected one of"),
    ("objective.name=moco", "objective.name: expected one of"),
    ("model.ssl_norm=gn", "model.ssl_norm: expected one of"),
    ("optim.accum_steps=0", "accum_steps must be >= 1"),
    ("train.log_every=0", "log_every must be >= 1"),
    ("data.batch_size=0", "batch_size must be >= 1"),
    ("data.caption_mode=foo", "data.caption_mode: expected one of"),
    ("optim.lr=-1", "optim.lr must be a number > 0, got -1"),
    ("optim.lr=.nan", "optim.lr must be a number > 0"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be a number >= 0"),
    ("optim.epochs=0", "optim.epochs must be a number > 0"),
    ("optim.betas=[0.9, 1.0]", "optim.betas must lie in"),
    ("optim.grad_clip=0", "optim.grad_clip must be > 0 or null"),
    ("optim.max_steps=0", "optim.max_steps must be >= 1 or null"),
    ("optim.max_steps=-3", "optim.max_steps must be >= 1 or null"),
    ("data.num_threads=0", "data.num_threads must be >= 1, got 0"),
    ("train.max_nonfinite=0", "train.max_nonfinite must be >= 1"),
    ("train.torch_threads=0", "train.torch_threads must be >= 1 or null"),
    ("checkpoint.every_steps=-1", "checkpoint.every_steps must be >= 0"),
])
def test_bad_override_is_a_clear_error(override, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        load_config(None, [override])


@pytest.mark.parametrize("override, key", [("data.caption_mode=foo", "data.caption_mode"),
                                           ("optim.lr=-1", "optim.lr"), ("data.num_threads=0", "data.num_threads"),
                                           ("optim.max_steps=0", "optim.max_steps"),
                                           ("optim.max_steps=-3", "optim.max_steps")])
def test_trainer_reports_a_bad_value_in_one_line(override, key, capsys):
    from trainer.run import main
    assert main([override]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("config error: ") and key in err


def test_yaml_error_names_file_and_line(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("out_dir: x\noptim:\n  lr: 0.1\n  warmup_epochs: soon\n")
    with pytest.raises(ConfigError, match=rf"{p}:4: optim.warmup_epochs: expected a number"):
        load_config(p)
    p.write_text("optim: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(p)


def test_cross_section_check():
    with pytest.raises(ConfigError, match="image_size"):
        load_config(None, ["model.preset=vit_tiny"])  # recipe still at 224
    with pytest.raises(ConfigError, match="backend=pillow"):
        load_config(None, ["data.backend=pillow", "data.device=gpu"])
    with pytest.raises(ConfigError, match="backend"):
        load_config(None, ["data.backend=opencv"])
    with pytest.raises(ConfigError, match="objective simclr needs data.recipe.num_ssl_views=2"):
        load_config(None, ["objective.name=simclr", "data.recipe.num_ssl_views=0"])
    assert load_config(None, ["objective.name=clip", "data.recipe.num_ssl_views=0"]).objective.name == "clip"


def test_sections_are_owned_by_their_components():
    """Every section of RunConfig is defined by the module of the component it configures."""
    import dataclasses

    from trainer.config import RunConfig
    owners = {"model": "trainer.models", "objective": "trainer.objectives", "data": "trainer.batches",
              "optim": "trainer.optim", "train": "trainer.loop", "checkpoint": "trainer.checkpoint",
              "eval": "trainer.evaluation.config", "debug": "trainer.policies", "finetune": "trainer.finetune",
              "dist": "trainer.distributed"}
    sections = {f.name: f.default_factory().__class__ for f in dataclasses.fields(RunConfig)
                if f.default_factory is not dataclasses.MISSING}
    assert set(sections) == set(owners)
    assert {name: cls.__module__ for name, cls in sections.items()} == owners


def test_round_trip(tmp_path):
    cfg = load_config(None, ["model.preset=vit_tiny", "data.recipe.image_size=64", "debug.inject_nan_at_steps=[3,4]"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


def test_parse_override_values():
    assert parse_override("a.b=3") == ("a.b", 3)
    assert parse_override("a=1e-4") == ("a", 1e-4)
    assert parse_override("a=runs/x") == ("a", "runs/x")


def test_dist_timeouts_are_typed_and_checked():
    cfg = load_config(None, ["dist.timeout_s=30", "dist.rank0_wait_s=600"])
    assert (cfg.dist.timeout_s, cfg.dist.rank0_wait_s) == (30.0, 600.0)
    assert load_config(None, []).dist.timeout_s == 60      # a dead peer ends the group within a minute
    for bad, says in (("dist.timeout_s=0", "timeout_s must be > 0"),
                      ("dist.rank0_wait_s=10", "rank0_wait_s must be >= timeout_s"),
                      ("dist.timeout_s=soon", "dist.timeout_s")):
        with pytest.raises(ConfigError, match=says):
            load_config(None, [bad])
