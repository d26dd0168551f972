"""The parallel strategies of a multi-process run (`train.parallel`): DDP (default) or FSDP2.

    model = wrap_model(model, cfg, d)              # DDP wrapper, or FSDP2 sharded in place (before the optimizer)
    is_fsdp(model)                                 # parameters are DTensors sharded on dim 0
    local_frozen_numel(model)                      # frozen elements held on this rank
    params, optim = full_trainable_state(model, optimizer, names)   # consolidated on rank 0 (a collective)
    load_full_optimizer(model, optimizer, optim)   # a full optimizer state dict into the shards

FSDP2 (`torch.distributed.fsdp.fully_shard`, one 1-D mesh over all ranks): each repeated trainable
block called through its `forward` is its own group (geometry frame blocks, bi-cross-attention,
camera adapters); the root group holds the other trainable parameters (embeddings, the global
aggregator blocks, which the IRG block calls half by half around the cross-attention, and the heads;
the root stays unsharded from forward through backward). The frozen backbone is left out
(`ignored_params`): replicated, no gradients, no collectives; with train.fsdp_shard_backbone each frozen
Wan block is sharded as its own unit instead (`shard_backbone_blocks`: all-gathered for forward, its two
halves and the backward through it; no gradients, no reduce-scatter), the embeddings and head replicated. bf16 runs on a GPU use a
MixedPrecisionPolicy (bf16 compute, fp32 gradient reduction); fp32 / CPU runs none.

speed.compile = "blocks" compiles the blocks in place before `wrap_model` (`fwmodel.train.speed.apply_speed`):
the module tree and parameter names stay, so DDP and the FSDP2 groups above wrap compiled blocks unchanged
(FSDP2's hooks run outside the compiled graphs; tests/train/test_speed_flags.py).
"""

from __future__ import annotations

import torch
from torch import nn

from fwmodel.train.distributed import Dist
from fwmodel.train.config import TrainConfig


def is_fsdp(model: nn.Module) -> bool:
    """True when `model` was sharded by `wrap_model` with FSDP2."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def wrap_model(model: nn.Module, cfg: TrainConfig, d: Dist) -> nn.Module:
    """The model the step runs: `model` itself (one process), its DDP wrapper, or `model` sharded by FSDP2.

    DDP covers the trainable part only (frozen parameters and buffers ignored). Build the optimizer
    from the returned model's parameters (FSDP2 replaces them by DTensors).
    """
    if not d.enabled:
        return model
    if cfg.train.parallel == "fsdp2":
        return _fully_shard(model, cfg, d)
    from torch.nn.parallel import DistributedDataParallel as DDP

    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    frozen += [n for n, _ in model.named_buffers()]
    DDP._set_params_and_buffers_to_ignore_for_model(model, frozen)
    return DDP(model, device_ids=[d.device.index] if d.device.type == "cuda" else None,
               find_unused_parameters=model.config.geometry.camera_token_projector, broadcast_buffers=False)


def _fully_shard(model: nn.Module, cfg: TrainConfig, d: Dist) -> nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(d.device.type, (d.world_size,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if cfg.model.mixed_precision == "bf16" and d.device.type == "cuda" else MixedPrecisionPolicy())
    frozen = {p for p in model.parameters() if not p.requires_grad}
    if cfg.train.fsdp_shard_backbone:  # frozen Wan blocks sharded, each its own unit (stored dtype, no grads)
        frozen -= shard_backbone_blocks(model.backbone, mesh)
    blocks = [*model.geometry.aggregator.frame_blocks, *model.interaction.bicross,
              *model.interaction.camera_adapters]
    for block in blocks:
        if any(p.requires_grad for p in block.parameters()):
            fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=frozen)
    return model


def shard_backbone_blocks(backbone: nn.Module, mesh) -> set[nn.Parameter]:
    """`fully_shard` each frozen Wan block of `backbone` (a `fwmodel.backbone.WanBackbone` with its weights
    already loaded) as its own FSDP2 unit; returns the parameters now managed (the rest of the backbone:
    patch/condition embeddings and the head, stays replicated, outside FSDP2).

    No MixedPrecisionPolicy: the blocks are all-gathered in their stored dtype (the trajectory of the
    replicated backbone). FSDP2 all-gathers a unit only around its hooked forward methods, so besides the
    block's `forward` (`WanBackbone.block`) the two halves the IRG blocks run around the interaction
    (`WanBackbone.attention_half` / `ffn_half`, which use the block's submodules directly) are routed through
    FSDP2 forward methods of the block (`register_fsdp_forward_method`): each half all-gathers the block
    and reshards it after (two all-gathers per IRG block in forward), registers the backward unshard on its
    outputs, and under activation checkpointing the recompute in backward finds the block unsharded.
    Frozen parameters get no gradients, hence no reduce-scatter."""
    from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method

    managed: set[nn.Parameter] = set()
    halves = {name: getattr(backbone, name) for name in ("attention_half", "ffn_half")}  # the bound methods
    for block in backbone.wan.blocks:
        managed |= set(block.parameters())
        fully_shard(block, mesh=mesh)
        for name, half in halves.items():
            setattr(block, f"fsdp_{name}", half)  # block.fsdp_attention_half(index, ...) = backbone's half, hooked
            register_fsdp_forward_method(block, f"fsdp_{name}")

    def route(name: str):
        def half(index: int, *args, **kwargs):
            return getattr(backbone.wan.blocks[index], f"fsdp_{name}")(index, *args, **kwargs)

        half.__doc__ = halves[name].__doc__
        return half

    for name in halves:  # instance attributes: WanBackbone.block's own calls of the halves are routed too
        setattr(backbone, name, route(name))
    return managed


def local_frozen_numel(model: nn.Module) -> int:
    """Elements of the frozen parameters held on this rank (the local shard of FSDP2-sharded ones)."""
    from torch.distributed.tensor import DTensor

    return sum((p.to_local() if isinstance(p, DTensor) else p).numel()
               for p in model.parameters() if not p.requires_grad)


def full_trainable_state(model: nn.Module, optimizer, names: list[str]) -> tuple[dict, dict]:
    """(parameter name -> full CPU tensor, full optimizer state dict keyed by parameter name) of the
    trainable parameters `names`, gathered from the FSDP2 shards. A collective: call it on every rank;
    the dicts are complete on rank 0 only (empty elsewhere)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    wanted, main = set(names), dist.get_rank() == 0
    params = {}
    for name, p in model.named_parameters():  # the trainable DTensors only: the backbone is not copied
        if name in wanted:
            full = p.detach().full_tensor()  # all-gather (every rank)
            if main:
                params[name] = full.cpu()
    optim = get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return params, optim


def load_full_optimizer(model: nn.Module, optimizer, state: dict) -> None:
    """Load a full optimizer state dict {"state": {name: {...}}, "param_groups": [{"params": [name, ...]}]}
    into the optimizer of an FSDP2 model (each rank keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
