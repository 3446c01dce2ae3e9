"""Strict YAML -> dataclass configs: error messages, overrides, base inheritance, round trips."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional

import pytest
import yaml

from mar.config import (ConfigError, DataConfig, OptimConfig, TrainConfig, config_from_dict, config_to_dict,
                        effective_lr, load_config, save_config)


def write(path, text: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def names(cls) -> str:
    return ", ".join(f.name for f in dataclasses.fields(cls))


def test_defaults_are_the_reference_recipe():
    cfg = load_config(TrainConfig)
    assert cfg == TrainConfig()
    o = cfg.optim
    assert (o.blr, o.betas, o.weight_decay, o.grad_clip, o.ema_rate, o.warmup_epochs) == (1e-4, (0.9, 0.95), 0.02,
                                                                                          3.0, 0.9999, 100)
    m = cfg.model
    assert (m.buffer_size, m.label_drop_prob, m.mask_ratio_min, m.diffusion_batch_mul, m.num_sampling_steps) == (
        64, 0.1, 0.7, 4, "100")
    assert cfg.train.trackers == ["jsonl"] and cfg.data.kind == "imagefolder"


def test_unknown_key_lists_valid_keys(tmp_path):
    p = write(tmp_path / "c.yaml", "optim:\n  bs: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, p)
    assert str(e.value) == f"{p}: unknown key 'optim.bs'; valid keys in section 'optim': {names(OptimConfig)}"

    p = write(tmp_path / "d.yaml", "optim:\n  batchsize: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, p)
    assert str(e.value) == (f"{p}: unknown key 'optim.batchsize' (did you mean 'batch_size'?); "
                            f"valid keys in section 'optim': {names(OptimConfig)}")

    p = write(tmp_path / "e.yaml", "opt:\n  blr: 1.0\n")
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, p)
    assert str(e.value) == (f"{p}: unknown key 'opt' (did you mean 'optim'?); valid keys at the top level: "
                            "task, model, tokenizer, data, optim, train, sample, vae, vq, perceptual, distill")


@pytest.mark.parametrize("text, message", [
    ("model:\n  img_size: abc\n", "model.img_size: expected int, got str 'abc'"),
    ("model:\n  img_size: 256.0\n", "model.img_size: expected int, got float 256.0"),
    ("model:\n  img_size: true\n", "model.img_size: expected int, got bool True"),
    ("data:\n  hflip: 1\n", "data.hflip: expected bool, got int 1"),
    ("data:\n  hflip: yes\n", "data.hflip: expected bool, got str 'yes'"),  # YAML 1.2: yes is a string
    ("optim:\n  blr: fast\n", "optim.blr: expected float, got str 'fast'"),
    ("optim:\n  lr: [1]\n", "optim.lr: expected float or null, got list [1]"),
    ("optim:\n  betas: [0.9]\n", "optim.betas: expected list of 2 [float, float], got 1 items [0.9]"),
    ("optim:\n  betas: [0.9, x]\n", "optim.betas[1]: expected float, got str 'x'"),
    ("model:\n  preset: 3\n", "model.preset: expected str, got int 3 (quote it in YAML)"),
    ("model:\n  num_sampling_steps: [10, 20]\n", "model.num_sampling_steps: expected int or str, got list [10, 20]"),
    ("model: 3\n", "model: expected section (a mapping of keys), got int 3"),
    ("train:\n  trackers: jsonl\n", "train.trackers: expected list of one of 'jsonl', 'tensorboard', got str 'jsonl'"),
])
def test_wrong_type_names_key_type_and_value(tmp_path, text, message):
    p = write(tmp_path / "c.yaml", text)
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, p)
    assert str(e.value) == f"{p}: {message}"


def test_bad_literal(tmp_path):
    p = write(tmp_path / "c.yaml", "data:\n  kind: mnist\n")
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, p)
    assert str(e.value) == f"{p}: data.kind: expected one of 'imagefolder', 'fashion_mnist', 'latents', got str 'mnist'"
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, overrides=["train.trackers=[jsonl, wandb]"])
    assert str(e.value) == ("override 'train.trackers=[jsonl, wandb]': train.trackers[1]: "
                            "expected one of 'jsonl', 'tensorboard', got str 'wandb'")


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_config(TrainConfig, tmp_path / "nope.yaml")
    assert str(e.value) == f"config file not found: {tmp_path / 'nope.yaml'}"
    p = write(tmp_path / "c.yaml", "base: gone.yaml\n")
    with pytest.raises(FileNotFoundError) as e:
        load_config(TrainConfig, p)
    assert str(e.value) == f"config file not found: {tmp_path / 'gone.yaml'} (the base of {p.resolve()})"


@pytest.mark.parametrize("text", ["optim.blr", "=3", "optim..blr=1", "optim.blr-x=1", "optim. blr=1", "--=1"])
def test_bad_override_syntax(text):
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, overrides=[text])
    assert str(e.value) == f"bad override {text!r}: expected section.key=value, e.g. optim.blr=2e-4"


def test_override_errors():
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, overrides=["optim.blr.x=1"])
    assert str(e.value) == "bad override 'optim.blr.x=1': 'optim.blr' is a value, not a section"
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, overrides=["--optim.bs=4"])
    assert str(e.value) == (f"override '--optim.bs=4': unknown key 'optim.bs'; "
                            f"valid keys in section 'optim': {names(OptimConfig)}")
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, overrides=["optim.batch_size=0"])
    assert str(e.value) == "override 'optim.batch_size=0': optim.batch_size must be >= 1, got 0"
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, overrides=["optim.betas=[0.9, 1.5]"])
    assert str(e.value) == "override 'optim.betas=[0.9, 1.5]': optim.betas must be in [0, 1), got [0.9, 1.5]"
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, overrides=["sample.clip_denoised=-1"])
    assert str(e.value) == ("override 'sample.clip_denoised=-1': sample.clip_denoised must be None / null (off, the "
                            "reference sampler) or a positive number r (the predicted x0 is clamped to [-r, r], in "
                            "token units), got -1.0")  # the one check of mar.config.SamplingOptions
    assert load_config(TrainConfig, overrides=["sample.clip_denoised=5"]).sample.clip_denoised == 5.0


STEPS_RULE = ("model.num_sampling_steps must be an int or a string of step counts like '100' or '10,20' "
              "(each count from 1 to its section's share of the 1000 training steps), got ")


@pytest.mark.parametrize("override, message", [
    ("train.save_every_steps=0", "train.save_every_steps must be >= 1, got 0"),
    ("train.log_every_steps=0", "train.log_every_steps must be >= 1, got 0"),
    ("train.sample_every_steps=-5", "train.sample_every_steps must be >= 1, got -5"),
    ("train.max_steps=0", "train.max_steps must be >= 1, or null to train for optim.epochs, got 0"),
    ("train.max_steps=-3", "train.max_steps must be >= 1, or null to train for optim.epochs, got -3"),
    ("optim.epochs=0", "optim.epochs must be >= 1, got 0"),
    ("optim.warmup_epochs=-0.5", "optim.warmup_epochs must be >= 0 (0 = no warmup), got -0.5"),
    ("optim.grad_clip=-1", "optim.grad_clip must be >= 0 (0 = no clipping), got -1.0"),
    ("data.num_workers=-1", "data.num_workers must be >= 0 (0 = load in the main process), got -1"),
    ("data.image_size=0", "data.image_size must be >= 1, got 0"),
    ("model.num_sampling_steps=0", STEPS_RULE + "'0'"),
    ("model.num_sampling_steps=abc", STEPS_RULE + "'abc'"),
    ("model.num_sampling_steps=2000", STEPS_RULE + "'2000'"),
    ("model.num_sampling_steps=600,10", STEPS_RULE + "'600,10'"),  # each of the 2 sections has 500 steps
    ('model.num_sampling_steps=""', STEPS_RULE + "''"),
])
def test_step_settings_are_checked_at_load_time(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, overrides=[override])
    assert str(e.value) == f"override {override!r}: {message}"


def test_step_settings_edges_are_accepted():
    cfg = load_config(TrainConfig, overrides=[
        "train.save_every_steps=1", "train.log_every_steps=1", "train.sample_every_steps=1", "train.max_steps=1",
        "optim.epochs=1", "optim.warmup_epochs=0", "optim.grad_clip=0", "data.num_workers=0", "data.image_size=1",
        "model.num_sampling_steps=1000"])
    assert (cfg.train.max_steps, cfg.optim.grad_clip, cfg.data.num_workers, cfg.model.num_sampling_steps) == (
        1, 0.0, 0, "1000")
    assert load_config(TrainConfig, overrides=["train.max_steps=null"]).train.max_steps is None


def test_num_sampling_steps_int_or_string(tmp_path):
    p = write(tmp_path / "c.yaml", "model:\n  num_sampling_steps: 50\n")
    cfg = load_config(TrainConfig, p)
    assert cfg.model.num_sampling_steps == 50 and type(cfg.model.num_sampling_steps) is int
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(TrainConfig, tmp_path / "run" / "config.yaml") == cfg  # the int form round-trips
    p = write(tmp_path / "d.yaml", 'model:\n  num_sampling_steps: "10,20"\n')
    assert load_config(TrainConfig, p).model.num_sampling_steps == "10,20"
    p = write(tmp_path / "e.yaml", "model:\n  num_sampling_steps: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, p)
    assert str(e.value) == f"{p}: {STEPS_RULE}0"
    p = write(tmp_path / "f.yaml", "model:\n  num_sampling_steps: true\n")
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, p)
    assert str(e.value) == f"{p}: model.num_sampling_steps: expected int or str, got bool True (quote it in YAML)"


def test_overrides_parse_yaml_and_keep_text_for_strings():
    cfg = load_config(TrainConfig, overrides=[
        "optim.blr=2e-4", "--optim.betas=[0.8, 0.99]", "optim.lr=null", "model.num_sampling_steps=50",
        "train.mixed_precision=no", "train.trackers=[jsonl, tensorboard]", "train.max_steps=10", "sample.cfg=3"])
    assert cfg.optim.blr == 2e-4 and type(cfg.optim.blr) is float
    assert cfg.optim.betas == (0.8, 0.99) and cfg.optim.lr is None
    assert cfg.model.num_sampling_steps == "50" and cfg.train.mixed_precision == "no"
    assert cfg.train.trackers == ["jsonl", "tensorboard"] and cfg.train.max_steps == 10
    assert cfg.sample.cfg == 3.0 and type(cfg.sample.cfg) is float  # ints are accepted for floats


def test_yaml_dialect_floats_and_no(tmp_path):
    p = write(tmp_path / "c.yaml", "optim:\n  blr: 1e-4\n  lr: 5E-3\ntrain:\n  mixed_precision: no\n")
    cfg = load_config(TrainConfig, p)
    assert cfg.optim.blr == 1e-4 and cfg.optim.lr == 5e-3 and cfg.train.mixed_precision == "no"


def test_precedence_base_file_then_overrides(tmp_path):
    write(tmp_path / "bases" / "root.yaml", "optim:\n  blr: 3.0e-4\n  batch_size: 32\n  epochs: 7\n"
                                            "model:\n  img_size: 64\n")
    write(tmp_path / "bases" / "mid.yaml", "base: root.yaml\noptim:\n  epochs: 8\ndata:\n  kind: latents\n")
    p = write(tmp_path / "run.yaml", "base: bases/mid.yaml\noptim:\n  blr: 2.0e-4\n")
    cfg = load_config(TrainConfig, p)
    assert (cfg.optim.blr, cfg.optim.batch_size, cfg.optim.epochs) == (2e-4, 32, 8)  # sections merge key by key
    assert cfg.model.img_size == 64 and cfg.data.kind == "latents" and cfg.model.vae_stride == 16
    cfg = load_config(TrainConfig, p, ["optim.blr=5e-4", "--optim.blr=6e-4", "optim.epochs=9"])
    assert (cfg.optim.blr, cfg.optim.batch_size, cfg.optim.epochs) == (6e-4, 32, 9)  # later override wins


def test_circular_base(tmp_path):
    a = write(tmp_path / "a.yaml", "base: b.yaml\n")
    write(tmp_path / "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match=r"circular 'base' chain"):
        load_config(TrainConfig, a)


def test_save_load_round_trip(tmp_path):
    cfg = load_config(TrainConfig, overrides=[
        "optim.lr=3e-4", "optim.betas=[0.5, 0.25]", "model.encoder_depth=2", "train.mixed_precision=no",
        "tokenizer.scaling_factor=0.5", "data.path=/x y/z", "train.trackers=[tensorboard]"])
    save_config(cfg, tmp_path / "run" / "config.yaml")
    assert load_config(TrainConfig, tmp_path / "run" / "config.yaml") == cfg
    plain = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert plain == config_to_dict(cfg) and plain["optim"]["betas"] == [0.5, 0.25]
    assert config_from_dict(TrainConfig, config_to_dict(cfg)) == cfg
    assert [p.name for p in (tmp_path / "run").iterdir()] == ["config.yaml"]  # no temporary file left


def test_effective_lr_is_derived_not_stored():
    cfg = load_config(TrainConfig, overrides=["optim.blr=2e-4"])
    assert effective_lr(cfg.optim, 1024) == pytest.approx(2e-4 * 1024 / 256)
    assert cfg.optim.lr is None
    cfg = load_config(TrainConfig, overrides=["optim.lr=1e-3"])
    assert effective_lr(cfg.optim, 1024) == 1e-3


# --- the machinery is generic: another schema with required keys and deeper nesting ---
@dataclass
class Inner:
    sizes: tuple[int, ...] = (1, 2)
    mode: Literal["a", "b"] = "a"


@dataclass
class Section:
    name: str  # required
    inner: Inner = field(default_factory=Inner)
    scale: Optional[float] = None  # noqa: UP045 (typing.Optional on purpose: both union spellings load)


@dataclass
class Other:
    section: Section = field(default_factory=lambda: Section(name="x"))


def test_generic_schema(tmp_path):
    p = write(tmp_path / "o.yaml", "section:\n  name: n\n  inner:\n    sizes: [3, 4, 5]\n")
    cfg = load_config(Other, p, ["section.inner.mode=b", "section.scale=2"])
    assert cfg == Other(Section(name="n", inner=Inner(sizes=(3, 4, 5), mode="b"), scale=2.0))
    # a partial section is merged onto the default instance of its parent's field (name="x" here)
    assert load_config(Other, write(tmp_path / "m.yaml", "section:\n  scale: 1.0\n")).section.name == "x"
    with pytest.raises(ConfigError) as e:
        config_from_dict(Section, {"scale": 1.0})
    assert str(e.value) == "missing required key 'name'"
    with pytest.raises(ConfigError) as e:
        load_config(Other, overrides=["section.inner.sizes=[1, 2.5]"])
    assert str(e.value) == ("override 'section.inner.sizes=[1, 2.5]': "
                            "section.inner.sizes[1]: expected int, got float 2.5")
    with pytest.raises(ConfigError) as e:
        config_from_dict(Other, {"section": {"name": "n", "inner": {"depth": 1}}})
    assert str(e.value) == f"unknown key 'section.inner.depth'; valid keys in section 'section.inner': {names(Inner)}"
    assert config_from_dict(DataConfig, {"kind": "fashion_mnist"}).kind == "fashion_mnist"


def test_duplicate_key_is_an_error(tmp_path):
    p = write(tmp_path / "dup.yaml", "optim:\n  ema_rate: 0.9\n  lr: 1.0e-3\n  ema_rate: 0.99\n")
    with pytest.raises(ConfigError, match=r"key 'ema_rate' appears twice in the same section \(line 4\)"):
        load_config(TrainConfig, p)


def test_every_committed_config_loads_and_the_main_job_recipes_resolve_through_their_bases():
    root = Path(__file__).resolve().parents[1] / "configs"
    for path in sorted(root.rglob("*.yaml")):
        load_config(TrainConfig, path)  # unknown keys, wrong types and ranges raise ConfigError naming the file
    tok = load_config(TrainConfig, root / "fmnist_main_tokenizer.yaml")
    assert (tok.task, tok.tokenizer.preset, tok.vae.disc_weight, tok.vae.perceptual_weight, tok.vae.export_ema) == \
        ("tokenizer", "kl_f4_c8_tiny", 0.0, 1.0, True)
    assert (tok.train.max_steps, tok.vae.perceptual_net) == (650, "runs/fmnist/perceptual_main/perceptual.safetensors")
    mar = load_config(TrainConfig, root / "fmnist_main_mar.yaml")
    assert (mar.model.preset, mar.model.patch_size, mar.model.diffusion_batch_mul, mar.tokenizer.preset,
            mar.train.max_steps) == ("mar_mini", 2, 2, "kl_f4_c8_tiny", 1600)
    main = (root.parent / ".ci" / "main").read_text()  # the job passes its steps on the command line: the same
    assert "mar_steps=1600;" in main and "tok_steps=650;" in main
    perc = load_config(TrainConfig, root / "fmnist_main_perceptual.yaml")
    full = load_config(TrainConfig, root / "fmnist_perceptual.yaml")
    assert (perc.task, perc.perceptual.widths, perc.data.split, perc.train.seed) == \
        ("feature_net", (16, 32, 64), full.data.split, full.train.seed)
