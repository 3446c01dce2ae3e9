"""The one run loader: weights, tokenizer and config from a run folder, a safetensors export or a checkpoint.

    run = load_run("runs/fmnist/mar")                                  # a train.py output folder (EMA export)
    run = load_run("pretrained/fmnist")                                # the shipped Fashion-MNIST weights
    run = load_run("checkpoint-last.pth", model="mar_base", tokenizer="kl16.ckpt")   # published MAR-B, KL-16
    images = run.tokenizer.decode(run.model.sample_tokens(4, num_iter=64, cfg=2.9, ...))

What can be given, and what is found:
- a **run folder**: its ``mar_ema.safetensors`` (EMA weights with the training config and tokenizer config in
  the metadata), or with ``ema=False`` / while it trains, its latest ``checkpoints/step-*.pt``; the tokenizer
  is the folder's ``tokenizer.safetensors``, else the config's ``tokenizer.checkpoint``;
- a **file**: a safetensors export, a project ``.pt`` checkpoint (EMA or raw weights, with its config), or a
  published ``checkpoint-last.pth`` (pickled ``argparse`` args: read with only that class allowed; no config,
  so ``model=`` names the preset and the other sizes are read off the tensors' shapes);
- ``tokenizer``: a project tokenizer ``.safetensors`` or an LDM-format VAE (``kl16.ckpt``, ``tokenizer_preset``).

The model comes back in eval mode with the weights loaded strictly (a mismatch is one message naming the
likely preset); with the training config's tokenizer config checked against the tokenizer file.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from mar.config.schema import SampleConfig
from mar.engine.checkpoint import (CheckpointError, find_latest_checkpoint, load_checkpoint,
                                   load_reference_mar_state_dict, read_safetensors)
from mar.eval.sample_folders import fingerprint
from mar.heads import DISTILLED_NAME, DiffusionHead, load_distilled_head
from mar.model import MAR
from mar.registry import PRESETS, create_model, load_state_dict_strict
from tokenizers import KLTokenizer, KLVAEConfig, open_tokenizer

SHIPPED_RUN = Path(__file__).resolve().parents[1] / "pretrained" / "fmnist"  # the embedded default's weights
EXPORT_NAME, TOKENIZER_NAME = "mar_ema.safetensors", "tokenizer.safetensors"


@dataclass
class Run:
    """A loaded model: ``model`` (eval), ``tokenizer`` (eval), the training ``config`` (plain dict, None for a
    published file), ``preset`` and the ``model_kwargs`` it was built with, and where everything came from."""

    model: MAR
    tokenizer: KLTokenizer
    config: dict | None
    preset: str
    model_kwargs: dict
    weights: Path
    tokenizer_path: Path
    run_dir: Path | None
    ema: bool
    state_dict: dict[str, torch.Tensor] = field(repr=False, default_factory=dict)

    @property
    def sample_defaults(self) -> SampleConfig:
        """The run's ``sample:`` section (its own cfg, num_iter, guard...), or the library defaults; a
        next-scale model's num_iter is its number of scales."""
        defaults = SampleConfig(**((self.config or {}).get("sample") or {}))
        scales = getattr(self.model, "num_scales", None)
        return dataclasses.replace(defaults, num_iter=scales) if scales else defaults

    @property
    def name(self) -> str:
        return self.run_dir.name if self.run_dir is not None else f"{self.preset}_{self.weights.stem}"

    def to(self, device) -> Run:
        self.model.to(device)
        self.tokenizer.to(device)
        return self


def load_run(source: str | Path | None = None, *, model: str | None = None, tokenizer: str | Path | None = None,
             tokenizer_preset: str = "kl16", ema: bool = True, num_sampling_steps: int | None = None,
             default: Path | None = SHIPPED_RUN, distilled_head: str | Path | bool | None = None) -> Run:
    """Load ``source`` (a run folder or a weights file; None = ``default``, the shipped weights) as a ``Run``.

    ``model`` names the preset of a config-less (published) checkpoint; ``num_sampling_steps`` rebuilds the
    head's sampler with that many diffusion steps. ``distilled_head``: a ``head_distilled.safetensors`` (train.py
    task=distill_head) to attach to the model's Diffusion Loss head for ``SamplingOptions.distilled_steps``; None
    = the run folder's, if any; False = none. A task=distill_head output folder (a distilled head, no MAR weights)
    as ``source`` loads the MAR weights the head was distilled from, with the head.
    """
    if source is not None and distilled_head is None and Path(source).is_dir() \
            and not (Path(source) / EXPORT_NAME).is_file() and (Path(source) / DISTILLED_NAME).is_file():
        distilled_head = Path(source) / DISTILLED_NAME
        source = distilled_teacher(distilled_head)
    weights, run_dir = resolve_weights(source, ema, default)
    state, config, tok_meta = read_weights(weights, ema)
    tok_path = find_tokenizer(tokenizer, run_dir, config, weights)
    tok = load_tokenizer(tok_path, tok_meta, config, tokenizer_preset)
    mar, preset, kwargs = build_model(state, config, model, tok, weights, num_sampling_steps)
    if distilled_head is None and run_dir is not None and (run_dir / DISTILLED_NAME).is_file():
        distilled_head = run_dir / DISTILLED_NAME
    if distilled_head:
        attach_distilled_head(mar, Path(distilled_head), state, weights)
    return Run(mar, tok.eval(), config, preset, kwargs, weights, tok_path, run_dir, ema, state)


def distilled_teacher(path: Path) -> Path:
    """The MAR weights a distilled head file was distilled from (its metadata's ``mar_weights``)."""
    teacher = load_distilled_head(path).info.get("mar_weights")
    if not teacher or not Path(teacher).exists():
        raise FileNotFoundError(f"{path} was distilled from {teacher or 'unrecorded MAR weights'}, not found here: pass "
                                f"--run <the MAR run> --distilled-head {path}")
    return Path(teacher)


def attach_distilled_head(mar, path: Path, state: dict, weights: Path) -> None:
    """Attach the distilled head file ``path`` to ``mar``'s Diffusion Loss head, after checking that it fits these
    weights: its sizes (token channels, condition width) and the fingerprint of the MAR weights it came from."""
    head = load_distilled_head(path)
    target = getattr(mar, "head", None)
    if not isinstance(target, DiffusionHead):
        raise ValueError(f"{path} is a distilled Diffusion Loss head, but {weights} has a "
                         f"{getattr(target, 'kind', type(target).__name__)} head of type {type(target).__name__}: "
                         "drop --distilled-head")
    target.attach_distilled(head, source=str(path))
    recorded = head.info.get("mar_fingerprint")
    if recorded and recorded != fingerprint(state):
        target.attach_distilled(None)
        raise ValueError(f"{path} was distilled from other MAR weights ({head.info.get('mar_weights', '?')}) than "
                         f"{weights}: pass those weights with --run/--checkpoint, or distill a head for these with "
                         f"train.py task=distill_head --distill.teacher={weights}")


def resolve_weights(source, ema: bool, default: Path | None) -> tuple[Path, Path | None]:
    """(weights file, run folder or None)."""
    if source is None:
        if default is None or not (default / EXPORT_NAME).is_file():
            raise ValueError("no weights given: pass --run RUN_DIR (a train.py output folder), or --checkpoint FILE "
                             "--model PRESET --tokenizer FILE (published: checkpoint-last.pth, mar_base, kl16.ckpt)")
        source = default
    source = Path(source)
    if source.is_file():
        return source, None
    if not source.is_dir():
        raise FileNotFoundError(f"{'run folder' if not source.suffix else 'checkpoint'} not found: {source}")
    if ema and (source / EXPORT_NAME).is_file():
        return source / EXPORT_NAME, source
    latest = find_latest_checkpoint(source)  # a run still training, or ema=False (the export holds EMA weights only)
    if latest is None:
        raise FileNotFoundError(f"{source} has no {EXPORT_NAME + ' or ' if ema else ''}checkpoints/step-*.pt"
                                f"{'' if ema else ' (--no-ema needs a training checkpoint)'}")
    return latest, source


def read_weights(path: Path, ema: bool) -> tuple[dict, dict | None, dict | None]:
    """(MAR state dict, training config or None, tokenizer config or None) of .safetensors/.pt/.pth weights."""
    if path.suffix == ".safetensors":
        state, meta = read_safetensors(path)
        want = "ema" if ema else "model"
        if meta.get("weights", want) != want:
            raise CheckpointError(f"{path} holds the '{meta['weights']}' weights only: "
                                  f"pass {'--no-ema' if ema else '--ema'}")
        return state, *(json.loads(meta[k]) if k in meta else None for k in ("config", "tokenizer"))
    try:
        unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:
        unsafe = []
    if unsafe:  # a published reference file (pickled argparse args): no config of ours
        return load_reference_mar_state_dict(path, ema=ema), None, None
    bare = _published_var_state(path)
    if bare is not None:  # a published var_d*.pth (or a VAR training checkpoint): no config, no EMA
        return bare, None, None
    ckpt = load_checkpoint(path)
    if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):  # a bare state dict, not a generator's
        tokenizer = "quantize.embedding.weight" in ckpt or any(k.startswith(("encoder.", "decoder.")) for k in ckpt)
        what = "it holds a tokenizer (VQVAE / VAE): pass it with --tokenizer" if tokenizer else \
            f"its keys are {sorted(ckpt)[:5]}"
        raise CheckpointError(f"{path} is a bare state dict but not generator weights: {what}")
    names = ("model_ema", "ema") if ema else ("model",)
    state = next((ckpt[n] for n in names if isinstance(ckpt.get(n), dict)), None)
    if state is None:
        raise CheckpointError(f"{path} has no {' or '.join(names)} weights (keys: {', '.join(map(str, ckpt))}); "
                              f"try {'--no-ema' if ema else '--ema'}")
    if not ema and ((ckpt.get("config") or {}).get("model") or {}).get("arch") == "var":
        state = {k.removeprefix("model."): v for k, v in state.items()}  # the training objective's "model." prefix
    return state, ckpt.get("config"), None


def _published_var_state(path: Path) -> dict | None:
    """The state dict of a published VAR transformer file (a bare dict of tensors with VAR's keys, or a reference
    training checkpoint's ['trainer']['var_wo_ddp']), or None for any other file."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return None
    trainer = obj.get("trainer") if isinstance(obj, dict) else None
    state = trainer.get("var_wo_ddp") if isinstance(trainer, dict) else obj
    if isinstance(state, dict) and "pos_1LC" in state and "class_emb.weight" in state \
            and all(isinstance(v, torch.Tensor) for v in state.values()):
        return dict(state)
    return None


def find_tokenizer(given, run: Path | None, config: dict | None, weights: Path) -> Path:
    """The tokenizer file: as given, the run folder's, or the training config's ``tokenizer.checkpoint``."""
    if given:
        return Path(given)
    if run is not None and (run / TOKENIZER_NAME).is_file():
        return run / TOKENIZER_NAME
    path = ((config or {}).get("tokenizer") or {}).get("checkpoint")
    if path:
        for cand in (Path(path), weights.parent / path, (run or weights.parent) / Path(path).name):
            if cand.is_file():
                return cand
        raise FileNotFoundError(f"tokenizer {path} (from the training config) not found: pass --tokenizer FILE")
    raise ValueError("no tokenizer: pass --tokenizer FILE (kl16.ckpt for the published models, or your run's "
                     "tokenizer .safetensors)")


def load_tokenizer(path: Path, expected: dict | None, config: dict | None, preset: str):
    """The tokenizer file, checked against ``expected`` (the config the model was trained with, from the export's
    metadata); an LDM-format file is read with that config, else the training config's preset and channels. A run
    trained on a VQ tokenizer's latent (``tokenizer.continuous``) gets that view of it."""
    t = (config or {}).get("tokenizer") or {}
    kl_fields = {f.name for f in dataclasses.fields(KLVAEConfig)}
    arch = KLVAEConfig.from_dict(expected) if expected and set(expected) == kl_fields else t.get("preset", preset)
    tok = open_tokenizer(path, arch, t.get("in_channels"), continuous=bool(t.get("continuous")))
    if expected is not None:  # the model was trained with this tokenizer config (incl. its scaling factor)
        try:
            want = type(tok.config).from_dict(expected)
        except (TypeError, ValueError):
            want = None
        same = (dataclasses.replace(tok.config, scaling_factor=want.scaling_factor) if hasattr(want, "scaling_factor")
                else tok.config) if want is not None else None
        if want is None or same != want:
            raise ValueError(f"tokenizer {path} is not the one the model was trained with ({tok.config} vs {expected})")
        tok.config = want
    elif t.get("scaling_factor") is not None:
        tok.config = dataclasses.replace(tok.config, scaling_factor=t["scaling_factor"])
    return tok


def build_model(state: dict, config: dict | None, preset: str | None, tok: KLTokenizer, path: Path, steps
                ) -> tuple[MAR, str, dict]:
    """(MAR with the weights loaded, preset, kwargs): sizes from our config, or from ``preset`` and the shapes."""
    if ((config or {}).get("model") or {}).get("arch") == "var" or (config is None and "pos_1LC" in state):
        return build_next_scale(state, config, preset, tok, path, steps)
    if config is not None:
        kwargs = dict(config["model"])
        own = kwargs.pop("preset")
        if preset and preset != own:
            raise ValueError(f"{path} holds a {own} model (from its config) but --model says {preset}: drop --model")
        for key, value in (("vae_stride", tok.stride), ("token_channels", tok.token_channels)):
            if kwargs.pop(key) != value:
                raise ValueError(f"the model was trained with {key}={config['model'][key]}, the tokenizer has {value}: "
                                 "pass the tokenizer of the run with --tokenizer")
        preset = own
    elif not preset:
        raise ValueError(f"{path} has no config: pass --model PRESET ({guess_preset(state)})")
    else:
        kwargs = infer_kwargs(state, tok.token_channels, tok.stride, str(path))
    if steps is not None and kwargs.get("head", "diffloss") != "diffloss":
        raise ValueError("--num-sampling-steps sets the Diffusion Loss head's steps; this model has a "
                         f"{kwargs['head']} head")
    if steps is not None:
        kwargs["num_sampling_steps"] = str(steps)
    model = create_model(preset, vae_stride=tok.stride, token_channels=tok.token_channels, **kwargs)
    try:
        load_state_dict_strict(model, state, source=str(path))
    except ValueError as e:
        raise ValueError(f"--model {preset}: {e} ({guess_preset(state)})") from None
    return model.eval(), preset, kwargs


def build_next_scale(state: dict, config: dict | None, preset: str | None, tok, path: Path, steps):
    """(VAR / HART / continuous next-scale model with the weights loaded and the tokenizer attached, preset,
    kwargs): sizes from our config, or for a published var_d*.pth from ``preset`` (var_d16...) and the shapes."""
    from mar.next_scale import VAR_PRESETS, _materialise
    from mar.registry import create_next_scale

    multiscale = tok.kind == "multiscale"
    if config is not None:
        kwargs = dict(config["model"])
        own = kwargs.pop("preset")
        if preset and preset != own:
            raise ValueError(f"{path} holds a {own} model (from its config) but --model says {preset}: drop --model")
        preset = own
        for key, value in (("vae_stride", tok.stride), ("token_channels", tok.token_channels)):
            if kwargs.pop(key) != value:
                raise ValueError(f"the model was trained with {key}={config['model'][key]}, the tokenizer has {value}: "
                                 "pass the tokenizer of the run with --tokenizer")
        kwargs.pop("arch")
    else:
        if preset not in VAR_PRESETS:
            depth = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
            raise ValueError(f"{path} is a published VAR transformer without a config: pass --model var_d{depth} "
                             f"(presets: {', '.join(VAR_PRESETS)}) and --tokenizer vae_ch160v4096z32.pth "
                             "--tokenizer-preset var_vqvae")
        if not multiscale or tok.token_channels != state["head.weight"].shape[0]:
            raise ValueError(f"{path} needs its multi-scale VQVAE (codebook {state['head.weight'].shape[0]} codes): "
                             "pass --tokenizer vae_ch160v4096z32.pth --tokenizer-preset var_vqvae")
        kwargs = {"head": "categorical", "num_classes": state["class_emb.weight"].shape[0] - 1}
    if multiscale:
        kwargs["patch_nums"] = tuple(tok.patch_nums)
        kwargs["token_dim"] = tok.config.z_channels
    if steps is not None:
        if kwargs.get("head", "categorical") == "categorical":
            raise ValueError("--num-sampling-steps sets a Diffusion Loss head's steps; VAR has a categorical head")
        kwargs["num_sampling_steps"] = str(steps)
    model = create_next_scale(preset, vae_stride=tok.stride, token_channels=tok.token_channels, device="meta",
                              **kwargs)
    _materialise(model, "cpu")
    load_state_dict_strict(model, state, source=str(path))
    return model.eval().attach(tok), preset, kwargs


def guess_preset(state: dict[str, torch.Tensor]) -> str:
    """Which preset's sizes a MAR state dict has, as words for error messages."""
    try:
        width = state["z_proj.weight"].shape[0]
        depth = len({k.split(".")[1] for k in state if k.startswith("encoder_blocks.")})
        head = (len({k.split(".")[3] for k in state if k.startswith("diffloss.net.res_blocks.")}),
                state["diffloss.net.input_proj.weight"].shape[0])
    except KeyError:
        return "it is not a MAR state dict"
    for name, p in PRESETS.items():
        sizes = (p["encoder_embed_dim"], p["encoder_depth"], p["diffloss_depth"], p["diffloss_width"])
        if sizes == (width, depth, *head):
            return f"it looks like {name}"
    return f"width {width}, depth {depth}, DiffLoss {head[0]}x{head[1]}: no preset has these sizes"


def infer_kwargs(state: dict[str, torch.Tensor], token_channels: int, vae_stride: int, source: str) -> dict[str, int]:
    """num_classes, buffer_size, patch_size and img_size of a config-less (published) MAR state dict:
    class_emb (K, D); diffusion_pos_embed (1, L, D); encoder_pos_embed (1, P+L, D); z_proj (D, C*p*p)."""
    try:
        classes, pos, enc, zproj = (state[k].shape for k in ("class_emb.weight", "diffusion_pos_embed_learned",
                                                             "encoder_pos_embed_learned", "z_proj.weight"))
    except KeyError as e:
        raise ValueError(f"{source} is not a MAR state dict (no {e})") from None
    side, patch = math.isqrt(pos[1]), math.isqrt(zproj[1] // token_channels)
    if side * side != pos[1] or patch * patch * token_channels != zproj[1]:
        raise ValueError(f"{source}: token width {zproj[1]} does not fit a tokenizer with {token_channels} channels")
    return {"num_classes": classes[0], "buffer_size": enc[1] - pos[1], "patch_size": patch,
            "img_size": side * patch * vae_stride}
