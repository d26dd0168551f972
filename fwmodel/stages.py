"""The two training stages: which parts train, and the one function that sets `requires_grad`.

    Stage 1 "latent bridging":        geometry.*  (latent bridge, time embedding, special tokens,
                                      camera-token projector if configured, aggregator, heads)
    Stage 2 "unified co-optimisation": geometry.* + interaction.* (bi-cross-attention, camera encoder,
                                      camera adapters)
    Never:                            backbone (the Wan2.1 DiT), in both stages.

Build the optimizer from `trainable_parameters(model)` so frozen parameters never get optimizer state.
"""

from __future__ import annotations

from torch import nn

STAGES = (1, 2)
# Top-level parts of FantasyWorldModel trained in each stage.
TRAINED_PARTS: dict[int, tuple[str, ...]] = {1: ("geometry",), 2: ("geometry", "interaction")}
FROZEN_PARTS: tuple[str, ...] = ("backbone",)


def check_stage(stage: int) -> int:
    if stage not in STAGES:
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    return stage


def set_trainable(model: nn.Module, stage: int) -> None:
    """Freeze everything, then unfreeze the parts trained in `stage`. The backbone stays frozen and in eval mode."""
    check_stage(stage)
    model.requires_grad_(False)
    for part in TRAINED_PARTS[stage]:
        getattr(model, part).requires_grad_(True)
    model.backbone.eval()


def report_modules(model: nn.Module) -> list[str]:
    """Dotted names of the modules a parameter report lists: `backbone`, then each child of the
    `geometry` and `interaction` containers (e.g. geometry.aggregator, interaction.bicross)."""
    names = ["backbone"]
    for part in ("geometry", "interaction"):
        names += [f"{part}.{child}" for child, _ in getattr(model, part).named_children()]
    return names


def trainable_module_names(model: nn.Module, stage: int) -> list[str]:
    """The report modules trained in `stage`, e.g. stage 1 -> geometry.bridge, ..., geometry.point_head."""
    check_stage(stage)
    return [name for name in report_modules(model) if name.split(".")[0] in TRAINED_PARTS[stage]]


def trainable_parameter_names(model: nn.Module, stage: int) -> list[str]:
    """Parameter names (state-dict keys) trained in `stage`, in model order."""
    check_stage(stage)
    return [name for name, _ in model.named_parameters() if name.split(".")[0] in TRAINED_PARTS[stage]]


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that currently require grad (give these, and only these, to the optimizer)."""
    return [p for p in model.parameters() if p.requires_grad]
