"""FSDP (``train.fsdp``): sharded data parallel training for the large generators (MAR-H, large VAR), FSDP2.

Glossary: W processes, P parameters (fp32), a unit = the parameters one all-gather brings in.

What is sharded (the wrap rule, ``wrap_classes``): every transformer block is one unit -- timm's ``Block``
(MAR, MaskGIT, the causal AR) and VAR's ``AdaLNSelfAttn`` (VAR, HART, continuous next-scale) -- and the root
(embeddings, norms, the per-token head) is the last. Each parameter becomes a DTensor sharded on dim 0
(``torch.distributed.fsdp.fully_shard``), all-gathered for its unit's forward and backward; gradients are
reduce-scattered, so each process holds P / W of the weights, gradients and AdamW moments. ``fsdp_sharding``:
full_shard frees a block's gathered weights after its forward (reshard_after_forward=True, ZeRO-3), shard_grad_op
keeps them to the backward (False: one all-gather less per block, more memory). ``fsdp_cpu_offload`` keeps the
shards (and the AdamW step) in CPU memory (CUDA only).

Who shards: on CUDA, accelerate (train.py passes its FSDP plugin, built from ``fsdp_plugin_kwargs``: the same rule); accelerate applies FSDP
only to GPU-like distributed types, so where it did not (``accelerator.distributed_type != "FSDP"``: CPU / gloo)
``shard_model`` applies the rule with ``fully_shard`` itself and only the optimizer goes through
``accelerator.prepare`` -- the model must not be wrapped in DDP on top (DDP would all-reduce the sharded gradients
again). ``fully_shard`` replaces the parameter objects, so the optimizer's groups are re-pointed by name (as
accelerate's FSDP2 prepare does); FSDP2 does not broadcast weights, so ``prepare`` first checks that every process
built (or loaded) the same ones.

Numerics: the DDP recipe, sharded: fp32 parameters and an fp32 gradient reduce-scatter (a MixedPrecisionPolicy
that casts nothing), bf16 compute from ``accelerator.autocast`` exactly as without FSDP (so all-gathers move fp32:
twice the traffic of a bf16 param_dtype, for results that match the DDP runs). Micro-batches before the last of a
step accumulate unsharded gradients (``set_requires_gradient_sync(False)``, as accelerate's ``no_sync``). The
gradient norm for clipping: ``accelerator.clip_grad_norm_`` is DTensor-aware (the norm over all shards).

Checkpoints are plain full state dicts, as without FSDP: the model's from ``get_model_state_dict`` (full, CPU; a
collective: every process calls, the main process receives and writes), the optimizer's from
``get_optimizer_state_dict`` re-keyed from parameter names to the parameter indices of
``torch.optim.Optimizer.state_dict``. So the format does not depend on how a run was trained: an FSDP checkpoint
loads for sampling on one device (``mar.run.load_run``) and resumes under DDP, and a DDP one resumes under FSDP;
a checkpoint records ``fsdp`` (how it was sharded) for information only.

EMA (``ShardedEMA``): each process keeps the EMA of its own shards, ema <- lerp(ema, shard, 1 - rate) on the local
tensors (elementwise, so the numbers of the full EMA, with no communication per step); ``gather_ema`` all-gathers
it, one parameter at a time, into the main process's full EMA module when a checkpoint, a sample grid or the export
needs it. Memory: 4P / W bytes per process, plus the full fp32 EMA module on the main process (4P: 3.8 GB for
MAR-H's 943M parameters), which the grids and the export use; the other processes free theirs.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_optimizer_state_dict)
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from mar.engine.checkpoint import CheckpointError


def wrap_classes() -> tuple[type, ...]:
    """The module classes that become FSDP units: the transformer blocks of every generator."""
    from timm.models.vision_transformer import Block

    from mar.next_scale import AdaLNSelfAttn

    return Block, AdaLNSelfAttn


def blocks_to_wrap(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, wrap_classes())]


def wrap_class_names(model: nn.Module) -> list[str]:
    """The names of the wrap classes present in ``model`` (accelerate refuses a name the model lacks)."""
    return sorted({type(m).__name__ for m in blocks_to_wrap(model)})


def fsdp_plugin_kwargs(run_cfg, cuda: bool) -> dict | None:
    """The keyword arguments of accelerate's FullyShardedDataParallelPlugin for ``train.fsdp`` on CUDA (None
    otherwise: no FSDP, or the CPU fallback ``shard_model``); train.py builds the plugin (this package does not
    import accelerate). The class names are narrowed to the model's at ``Sharding.prepare``."""
    if not (run_cfg.fsdp and cuda):
        return None
    return dict(fsdp_version=2, auto_wrap_policy="transformer_based_wrap",
                transformer_cls_names_to_wrap=[c.__name__ for c in wrap_classes()],
                reshard_after_forward=run_cfg.fsdp_sharding == "full_shard", cpu_offload=run_cfg.fsdp_cpu_offload,
                mixed_precision_policy=MixedPrecisionPolicy(), state_dict_type="FULL_STATE_DICT",
                cpu_ram_efficient_loading=False, activation_checkpointing=False)


def applied_by_accelerator(accelerator) -> bool:
    return getattr(accelerator, "distributed_type", None) == "FSDP"  # a str enum: no accelerate import


def sharding_for(run_cfg, task_name: str, accelerator) -> Sharding | None:
    """The run's ``Sharding``, or None for the plain (DDP / one device) path; refuses what FSDP does not cover."""
    if applied_by_accelerator(accelerator) and not run_cfg.fsdp:
        raise ValueError("accelerate was launched with FSDP (accelerate config / --use_fsdp) but train.fsdp is false: "
                         "set train.fsdp=true (the FSDP settings are the config's train.fsdp_*), or launch without FSDP")
    if not run_cfg.fsdp:
        return None
    if task_name != "mar":
        raise ValueError(f"train.fsdp is for task=mar (the generators); task={task_name} trains small models that "
                         "fit on one device: set train.fsdp=false")
    if accelerator.num_processes == 1:
        accelerator.print("train.fsdp: one process, nothing to shard: training unsharded")
        return None
    return Sharding(run_cfg, accelerator)


def shard_model(model: nn.Module, optimizer: torch.optim.Optimizer, run_cfg) -> nn.Module:
    """Shard ``model`` in place with ``fully_shard`` (every block, then the root) and re-point ``optimizer``'s
    groups at the sharded parameters. For launches where accelerate did not apply FSDP (CPU / gloo)."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("shard_model needs the launch's process group (accelerate launch or torchrun)")
    if optimizer.state:
        raise RuntimeError("shard the model before loading the optimizer state (it is keyed by parameter objects)")
    device = next(model.parameters()).device
    if run_cfg.fsdp_cpu_offload and device.type == "cpu":
        raise ValueError("train.fsdp_cpu_offload moves the shards of a GPU run to CPU memory, and this run is on the "
                         "CPU already: drop train.fsdp_cpu_offload")
    kwargs = {"mp_policy": MixedPrecisionPolicy(),
              "offload_policy": CPUOffloadPolicy() if run_cfg.fsdp_cpu_offload else OffloadPolicy()}
    name_of = {id(p): n for n, p in model.named_parameters()}  # the optimizer keeps the old objects alive
    for block in blocks_to_wrap(model):
        fully_shard(block, reshard_after_forward=run_cfg.fsdp_sharding == "full_shard", **kwargs)
    fully_shard(model, **kwargs)  # the root: FSDP2's default keeps its weights gathered to the backward
    new = dict(model.named_parameters())
    for group in optimizer.param_groups:
        group["params"] = [new[name_of[id(p)]] for p in group["params"]]
    return model


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def _raw(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps it


class ShardedEMA:
    """The EMA of a sharded model as shards (see the module docstring); ``ema`` is the full EMA module it starts
    from (a copy of the model, or a checkpoint's EMA), kept on the main process and freed on the others."""

    def __init__(self, ema: nn.Module, source: nn.Module, main: bool):
        params, own = dict(source.named_parameters()), dict(ema.named_parameters())
        if params.keys() != own.keys():
            raise ValueError("the EMA copy and the model have different parameters: the EMA must be a copy of the "
                             "model it follows")
        self.shards, self.main, self.stale = {}, main, False
        with torch.no_grad():
            for name, p in params.items():
                e = own[name].detach()
                if isinstance(p, DTensor):  # this process's rows, cut as FSDP cut the parameter
                    local = distribute_tensor(e.to(p.device_mesh.device_type), p.device_mesh, p.placements,
                                              src_data_rank=None).to_local()
                    if local.shape != p.to_local().shape:
                        raise RuntimeError(f"EMA shard of {name} has shape {tuple(local.shape)}, the parameter's "
                                           f"{tuple(p.to_local().shape)}: the EMA cannot follow this sharding")
                    e = local.to(p.to_local().device)
                self.shards[name] = e.clone()
        if not main:
            ema.to("meta")  # only the main process samples and writes: the others keep the shards only

    @torch.no_grad()
    def update(self, source: nn.Module, rate: float) -> None:
        """ema <- rate * ema + (1 - rate) * model on this process's shards (``mar.engine.loop.ema_update``)."""
        for name, p in source.named_parameters():
            e = self.shards[name]
            e.lerp_(_local(p).detach().to(e.dtype), 1.0 - rate)
        self.stale = True

    @torch.no_grad()
    def gather(self, source: nn.Module, ema: nn.Module) -> None:
        """Collective: the full EMA into the main process's ``ema`` module (parameters, then the buffers, which
        are not sharded); nothing to do when it is current."""
        if not self.stale:
            return
        own = dict(ema.named_parameters()) if self.main else {}
        for name, p in source.named_parameters():
            shard = self.shards[name]
            if isinstance(p, DTensor):
                shard = DTensor.from_local(shard.to(p.device_mesh.device_type), p.device_mesh, p.placements,
                                           run_check=False, shape=p.shape, stride=p.stride()).full_tensor()
            if self.main:
                own[name].copy_(shard)
        if self.main:
            buffers = dict(source.named_buffers())
            for name, b in ema.named_buffers():
                b.copy_(buffers[name])
        self.stale = False


class Sharding:
    """What ``fit`` does differently under ``train.fsdp`` (one object per run; None in fit = the plain path)."""

    def __init__(self, run_cfg, accelerator):
        self.cfg, self.accelerator = run_cfg, accelerator
        self.by_accelerator = applied_by_accelerator(accelerator)
        self.ema: ShardedEMA | None = None

    def describe(self) -> dict:
        return {"processes": self.accelerator.num_processes, "sharding": self.cfg.fsdp_sharding,
                "cpu_offload": self.cfg.fsdp_cpu_offload, "by": "accelerate" if self.by_accelerator else "fully_shard"}

    def prepare(self, model: nn.Module, optimizer, ema: nn.Module, ema_source, optimizer_state: dict | None):
        """Shard ``model`` (accelerate's plugin, else ``shard_model``), prepare the optimizer, load
        ``optimizer_state`` (a checkpoint's, plain format) into the shards and start the sharded EMA."""
        self._check_same_weights(model)
        if self.by_accelerator:
            self.accelerator.state.fsdp_plugin.transformer_cls_names_to_wrap = wrap_class_names(model)
            model, optimizer = self.accelerator.prepare(model, optimizer)
        else:
            shard_model(model, optimizer, self.cfg)
            optimizer = self.accelerator.prepare(optimizer)
        if optimizer_state is not None:
            self.load_optimizer_state(model, optimizer, optimizer_state)
        self.ema = ShardedEMA(ema, ema_source(model), self.accelerator.is_main_process)
        return model, optimizer

    def _check_same_weights(self, model: nn.Module) -> None:
        """FSDP2 keeps each process's own rows (DDP broadcasts rank 0's): every process must hold the same."""
        with torch.no_grad():
            ts = [t.detach().double() for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
            fp = torch.stack([sum(t.sum() for t in ts), sum((t * t).sum() for t in ts)])
        every = self.accelerator.gather(fp.unsqueeze(0))
        if not bool((every == every[0]).all()):
            raise RuntimeError(f"the processes built different initial weights ({every.tolist()}); FSDP does not "
                               "broadcast them: build the model from the config's seeded generator")

    @contextlib.contextmanager
    def no_sync(self, model: nn.Module):
        """A micro-batch before the step's last: gradients accumulate unsharded, reduce-scattered at the last."""
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def load_optimizer_state(self, model: nn.Module, optimizer, state: dict) -> None:
        """A plain (index-keyed) full optimizer state dict into the sharded optimizer; every process holds it."""
        raw = _raw(optimizer)
        name_of = {id(p): n for n, p in model.named_parameters()}
        order = [name_of[id(p)] for g in raw.param_groups for p in g["params"]]
        groups = state.get("param_groups") or []
        if not all(isinstance(k, int) for k in state.get("state", {})) or \
                [len(g["params"]) for g in groups] != [len(g["params"]) for g in raw.param_groups]:
            raise CheckpointError("the checkpoint's optimizer state is not the plain index-keyed state of this model's "
                                  "optimizer (torch.optim.Optimizer.state_dict): resume it with the config and the "
                                  "train.py that wrote it, or start a new train.output_dir")
        named = {"state": {order[i]: v for i, v in state["state"].items()},
                 "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in groups]}
        set_optimizer_state_dict(model, raw, named, options=StateDictOptions(full_state_dict=True))

    def full_states(self, model: nn.Module, optimizer, ema: nn.Module, ema_source: nn.Module):
        """Collective: (model, EMA, optimizer) full plain state dicts on the main process, None on the others."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(model, options=options)
        named = get_optimizer_state_dict(model, _raw(optimizer), options=options)
        self.gather_ema(ema_source, ema)
        if not self.accelerator.is_main_process:
            return None
        index = {n: i for i, n in enumerate(n for g in named["param_groups"] for n in g["params"])}
        opt_sd = {"state": {index[n]: v for n, v in named["state"].items()},
                  "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]}
        return model_sd, ema.state_dict(), opt_sd

    def ema_update(self, source: nn.Module, rate: float) -> None:
        self.ema.update(source, rate)

    def gather_ema(self, source: nn.Module, ema: nn.Module) -> None:
        self.ema.gather(source, ema)

    @torch.no_grad()
    def check_in_sync(self, model: nn.Module) -> None:
        """Each shard is held once, so only the replicated tensors (buffers, unsharded parameters) can diverge:
        they must be bit-identical; the printed fingerprint (sum, sum of squares) is over the full parameters."""
        acc = self.accelerator
        shards = [_local(p).detach().double() for p in model.parameters() if isinstance(p, DTensor)]
        full = acc.reduce(torch.stack([sum(s.sum() for s in shards), sum((s * s).sum() for s in shards)]),
                          reduction="sum")
        replicated = [t.detach().double() for t in (*[p for p in model.parameters() if not isinstance(p, DTensor)],
                                                    *model.buffers()) if t.is_floating_point()]
        zero = torch.zeros((), dtype=torch.float64, device=full.device)
        local = torch.stack([sum((t.sum() for t in replicated), zero), sum(((t * t).sum() for t in replicated), zero)])
        every = acc.gather(local.unsqueeze(0))
        if not bool((every == every[0]).all()):
            raise RuntimeError(f"processes ended with different buffers: {every.tolist()}")
        acc.print(f"parameters consistent on all {acc.num_processes} processes (FSDP: each shard held once, "
                  f"replicated buffers identical; fingerprint {full[0].item():.10e}, {full[1].item():.10e})")
