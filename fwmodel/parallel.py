"""The parallel strategies of a multi-process run (`train.parallel`): DDP (default) or FSDP2.

    model = wrap_model(model, cfg, d)              # DDP wrapper, or FSDP2 sharded in place (before the optimizer)
    is_fsdp(model)                                 # parameters are DTensors sharded on dim 0
    params, optim = full_trainable_state(model, optimizer, names)   # consolidated on rank 0 (a collective)
    load_full_optimizer(model, optimizer, optim)   # a full optimizer state dict into the shards

FSDP2 (`torch.distributed.fsdp.fully_shard`, one 1-D mesh over all ranks): each repeated trainable
block called through its `forward` is its own group (geometry frame blocks, bi-cross-attention,
camera adapters); the root group holds the other trainable parameters (embeddings, the global
aggregator blocks, which the IRG block calls half by half around the cross-attention, and the heads;
the root stays unsharded from forward through backward). The frozen backbone is left out
(`ignored_params`): replicated, no gradients, no collectives. bf16 runs on a GPU use a
MixedPrecisionPolicy (bf16 compute, fp32 gradient reduction); fp32 / CPU runs none.
"""

from __future__ import annotations

import torch
from torch import nn

from fwmodel.distributed import Dist
from fwmodel.train_config import TrainConfig


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
    blocks = [*model.geometry.aggregator.frame_blocks, *model.interaction.bicross,
              *model.interaction.camera_adapters]
    for block in blocks:
        if any(p.requires_grad for p in block.parameters()):
            fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp, ignored_params=frozen)
    return model


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
