"""Parameter report ("verify the two-stage configuration"), built on the meta device.

`parameter_report(preset, stage)` builds the model with `torch.device("meta")` (no memory, no
weights, seconds even for 14B), applies `set_trainable(stage)` and counts parameters per report
module (see fwmodel.stages.report_modules). `fwmodel verify` prints it as a table or as JSON:

    {"preset": ..., "stage": 1|2,
     "modules": [{"name": "geometry.aggregator", "params": 605028352, "trainable": true}, ...],
     "totals": {"frozen": <backbone>, "stage1_trainable": ..., "stage2_trainable": ...}}
"""

from __future__ import annotations

import torch
from pydantic import BaseModel

from fwmodel.config import ModelConfig, get_preset
from fwmodel.stages import TRAINED_PARTS, check_stage, report_modules, set_trainable


class ModuleParams(BaseModel):
    name: str
    params: int
    trainable: bool


class ParamTotals(BaseModel):
    frozen: int  # the Wan backbone, frozen in both stages
    stage1_trainable: int
    stage2_trainable: int


class ParamReport(BaseModel):
    preset: str
    stage: int
    modules: list[ModuleParams]
    totals: ParamTotals

    @property
    def stage2_extra(self) -> int:
        return self.totals.stage2_trainable - self.totals.stage1_trainable


def build_meta_model(config: ModelConfig):
    """FantasyWorldModel with every tensor on the meta device (shapes only)."""
    from fwmodel.model import FantasyWorldModel

    with torch.device("meta"):
        return FantasyWorldModel(config)


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parameter_report(preset: str | ModelConfig, stage: int) -> ParamReport:
    """Per-module parameter counts of `preset` with the trainable flags of `stage`."""
    check_stage(stage)
    config = get_preset(preset) if isinstance(preset, str) else preset
    model = build_meta_model(config)
    set_trainable(model, stage)

    modules = []
    for name in report_modules(model):
        module = model.get_submodule(name)
        params = list(module.parameters())
        modules.append(
            ModuleParams(
                name=name, params=sum(p.numel() for p in params), trainable=any(p.requires_grad for p in params)
            )
        )
    assert sum(m.params for m in modules) == count_parameters(model), "report modules must cover the model"

    def trained_in(s: int) -> int:
        return sum(m.params for m in modules if m.name.split(".")[0] in TRAINED_PARTS[s])

    frozen = sum(m.params for m in modules if m.name.split(".")[0] not in TRAINED_PARTS[2])
    totals = ParamTotals(frozen=frozen, stage1_trainable=trained_in(1), stage2_trainable=trained_in(2))
    return ParamReport(preset=config.name, stage=stage, modules=modules, totals=totals)


def format_millions(n: int) -> str:
    return f"{n / 1e6:,.1f}M" if n >= 1e6 else f"{n / 1e6:.3f}M"


def render_table(report: ParamReport):
    """A rich Table of the report (modules, then the totals)."""
    from rich.table import Table

    table = Table(title=f"{report.preset}: Stage {report.stage}", show_footer=False)
    table.add_column("module")
    table.add_column("params", justify="right")
    table.add_column("exact", justify="right", style="dim")
    table.add_column(f"stage {report.stage}")
    for m in report.modules:
        status = "[green]trainable[/green]" if m.trainable else "[dim]frozen[/dim]"
        table.add_row(m.name, format_millions(m.params), f"{m.params:,}", status)
    t = report.totals
    table.add_section()
    table.add_row("frozen backbone (both stages)", format_millions(t.frozen), f"{t.frozen:,}", "frozen")
    table.add_row("Stage-1 trainable", format_millions(t.stage1_trainable), f"{t.stage1_trainable:,}", "")
    table.add_row("Stage-2 trainable", format_millions(t.stage2_trainable), f"{t.stage2_trainable:,}", "")
    table.add_row("Stage 2 - Stage 1", format_millions(report.stage2_extra), f"{report.stage2_extra:,}", "")
    return table
