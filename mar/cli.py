"""Command-line pieces shared by the entry points (sample.py, evaluate.py, benchmarks/): the weights and
generation flags, and their conversion into the library's objects right at the entry point.

Only the scripts import this module; what it returns is plain data (paths, ``SamplingOptions``, a ``Run``),
so no argparse object goes further.
"""
from __future__ import annotations

import argparse
import math

from mar.config.schema import PRECISIONS, SampleConfig, SamplingOptions
from mar.next_scale import VAR_PRESETS
from mar.registry import PRESETS
from mar.run import Run, load_run

OPTION_FLAGS = ("sampler", "eta", "diffusion_steps", "diffusion_steps_shape", "precision", "clip_denoised", "top_k",
                "top_p", "choice_temperature", "more_smooth", "feature_cache", "cache_refresh", "distilled_steps",
                "row_bucket")


def parse_clip_denoised(text: str) -> float:
    """A --clip-denoised argument (argparse type): a positive finite number, or 'off' / 'none', returned as 0.0
    (explicitly off, whatever the run's config says)."""
    if text.strip().lower() in ("off", "none"):
        return 0.0
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'off', got {text!r}") from None
    if not 0.0 < value < math.inf:
        raise argparse.ArgumentTypeError(f"expected a positive number or 'off', got {text!r}")
    return value


def add_weights_args(p: argparse.ArgumentParser, default_help: str = "the shipped pretrained/fmnist") -> None:
    src = p.add_mutually_exclusive_group()
    src.add_argument("--run", help=f"train.py output folder (default: {default_help})")
    src.add_argument("--checkpoint", help="MAR weights: ours (.pt/.safetensors) or the published checkpoint-last.pth")
    p.add_argument("--model", help="preset of a published checkpoint: MAR " + ", ".join(PRESETS) + "; VAR "
                   + ", ".join(VAR_PRESETS))
    p.add_argument("--tokenizer", help="published kl16.ckpt (LDM format) or vae_ch160v4096z32.pth (VAR), or a project "
                                       ".safetensors")
    p.add_argument("--tokenizer-preset", default="kl16", help="architecture of a published tokenizer file (kl16; "
                                                              "var_vqvae for VAR's)")
    p.add_argument("--ema", action=argparse.BooleanOptionalAction, default=True, help="EMA weights (default)")
    p.add_argument("--num-sampling-steps", type=int, help="diffusion steps per token (default: the model's, 100)")
    p.add_argument("--distilled-head", help="a distilled head's .safetensors (train.py task=distill_head) to load "
                                            "beside the MAR weights (default: the run folder's head_distilled"
                                            ".safetensors, if any); used with --distilled-steps")


def add_generation_args(p: argparse.ArgumentParser, lists: bool = True) -> None:
    """--num-iter/--cfg/--temperature (lists: one setting per combination), --cfg-schedule, and the options."""
    many = {"nargs": "+"} if lists else {}
    p.add_argument("--num-iter", type=int, **many, help="MAR generation steps (default: the run's, else 64; a "
                                                        "next-scale model: its number of scales)")
    p.add_argument("--cfg", type=float, **many, help="guidance scale(s), >= 0 (default: the run's, else 1; MAR: 1 = "
                                                     "none; next-scale (VAR): t, 0 = none)")
    p.add_argument("--temperature", type=float, **many, help="diffusion noise temperature(s), > 0 (default: 1)")
    p.add_argument("--cfg-schedule", choices=("linear", "constant"))
    add_option_args(p.add_argument_group("sampler options (opt-in; the defaults are the run's, else the exact "
                                         "reference)"))


def add_option_args(fast, lists: bool = False) -> None:
    """The ``SamplingOptions`` flags (each defaults to the run's ``sample:`` value); ``lists``: --top-k and --top-p
    take several values (a sweep's axes)."""
    many = {"nargs": "+"} if lists else {}
    fast.add_argument("--precision", choices=tuple(PRECISIONS), help="autocast dtype of the generator and head")
    fast.add_argument("--sampler", choices=("ddpm", "ddim"), help="diffusion sampler of the head")
    fast.add_argument("--eta", type=float, help="DDIM noise (0 = deterministic)")
    fast.add_argument("--diffusion-steps", type=int, nargs=2, metavar=("FIRST", "LAST"),
                      help="diffusion steps annealed from the first to the last MAR iteration (e.g. 50 10)")
    fast.add_argument("--diffusion-steps-shape", choices=("linear", "cosine"), help="shape of that annealing")
    fast.add_argument("--clip-denoised", type=parse_clip_denoised, metavar="R|off",
                      help="guard: clamp the head's predicted x0 to [-R, R] at every diffusion step (token units); "
                           "'off' = the reference sampler (default: the run's sample.clip_denoised, else off)")
    fast.add_argument("--top-k", type=int, metavar="K", **many, help="categorical heads: sample among the K most likely codes "
                                                             "(ties kept; default: all)")
    fast.add_argument("--top-p", type=float, metavar="P", **many, help="categorical heads: sample in the nucleus of mass P "
                                                               "(0 < P <= 1; default: all)")
    fast.add_argument("--more-smooth", action=argparse.BooleanOptionalAction, default=None,
                      help="next-scale (VAR) models: Gumbel-softmax mixtures of code embeddings instead of sampled codes "
                           "(the reference's visualisation option; off in its FID protocol)")
    fast.add_argument("--choice-temperature", type=float, metavar="T",
                      help="MaskGIT: scale of the Gumbel noise on the pick confidence, annealed to 0 (default 4.5)")
    fast.add_argument("--feature-cache", choices=("off", "cfg", "tokens", "both"),
                      help="feature caching across MAR steps (LazyMAR-like): 'cfg' reuses the unconditional branch's "
                           "residual, 'tokens' recomputes only the tokens whose context changed, between full "
                           "forwards every --cache-refresh steps (default: off, the reference loop)")
    fast.add_argument("--cache-refresh", type=int, metavar="R", help="with --feature-cache: a full forward every R "
                                                                     "MAR steps (default 2)")
    fast.add_argument("--distilled-steps", type=int, metavar="S",
                      help="sample with the distilled head (--distilled-head FILE, or the run's head_distilled"
                           ".safetensors) in S steps (1-8) instead of the Diffusion Loss sampler")
    fast.add_argument("--row-bucket", type=int, metavar="R",
                      help="static shapes for CUDA graphs: the head runs on its rows padded to a multiple of R "
                           "(same draws, tokens equal to rounding; default: the rows as they come)")


def run_from_args(args: argparse.Namespace, default=None) -> Run:
    """``load_run`` with the weights flags (``default``: the run used when neither --run nor --checkpoint is given)."""
    source = args.checkpoint or args.run
    kwargs = {} if default is None else {"default": default}
    return load_run(source, model=args.model, tokenizer=args.tokenizer, tokenizer_preset=args.tokenizer_preset,
                    ema=args.ema, num_sampling_steps=args.num_sampling_steps,
                    distilled_head=getattr(args, "distilled_head", None), **kwargs)


def options_from_args(args: argparse.Namespace, defaults: SampleConfig, swept: tuple[str, ...] = ()) -> SamplingOptions:
    """The sampler options: each flag given wins over the run's ``sample:`` value (``--clip-denoised off`` = None);
    the ``swept`` options (lists: a sweep's axes) keep the run's value here."""
    given = {"sampler": args.sampler, "eta": args.eta, "precision": args.precision,
             "diffusion_steps_schedule": tuple(args.diffusion_steps) if args.diffusion_steps else None,
             "diffusion_steps_shape": args.diffusion_steps_shape,
             "clip_denoised": None if args.clip_denoised is None else (args.clip_denoised or "off"),
             "top_k": args.top_k, "top_p": args.top_p, "choice_temperature": args.choice_temperature,
             "more_smooth": getattr(args, "more_smooth", None),
             "feature_cache": getattr(args, "feature_cache", None), "cache_refresh": getattr(args, "cache_refresh", None),
             "distilled_steps": getattr(args, "distilled_steps", None), "row_bucket": getattr(args, "row_bucket", None)}
    values = {k: getattr(defaults, k) if v is None or k in swept else v for k, v in given.items()}
    if values["clip_denoised"] == "off":
        values["clip_denoised"] = None
    if args.sampler == "ddpm" and args.eta is None:
        values["eta"] = 0.0  # asking for ddpm drops a run's DDIM eta
    return SamplingOptions(**values)
