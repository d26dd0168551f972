"""`fwmodel doctor`: fwdata's generic environment checks plus the Wan2.1 weights that training will load.

The weights check calls `fwmodel.backbone.check_wan_weights`, the validation `fwmodel train` runs
before it loads the backbone (`load_wan_transformer`), so the doctor passes exactly the weight paths
that training accepts (short of reading the tensor data itself).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from rich.console import Console

from fwdata.doctor import Check, DoctorOptions, run_doctor

WEIGHTS_CHECK = "wan2.1 weights"


def wan_weights_check(weights: Optional[str | Path], preset: str) -> Check:
    """One doctor row for `--weights` (as `model.wan_weights`) with `--preset` (as `model.preset`)."""
    if weights is None or str(weights) == "":
        if preset == "tiny":  # training builds a random backbone then
            return Check(WEIGHTS_CHECK, True, "not set: preset tiny uses a random backbone (tests and demos only)",
                         required=False)
        return Check(WEIGHTS_CHECK, False, "not configured: pass --weights PATH (diffusers directory or single "
                     ".safetensors file)", required=False)
    if str(weights) == "random":
        return Check(WEIGHTS_CHECK, True, "random: a randomly initialised backbone (tests and demos only)",
                     required=False)
    try:
        from fwmodel.backbone import BackboneWeightsError, check_wan_weights
        from fwmodel.config import get_preset
    except Exception as err:  # torch or a dependency is broken: the torch/package rows say which
        return Check(WEIGHTS_CHECK, False, f"cannot check the weights: {type(err).__name__}: {err}")
    config = get_preset(preset)
    try:
        found = check_wan_weights(weights, config.wan, config.hub_id)
    except BackboneWeightsError as err:
        return Check(WEIGHTS_CHECK, False, str(err))
    return Check(WEIGHTS_CHECK, True, f"{found.describe()}; matches preset {preset}")


def run_training_doctor(output: Path, weights: Optional[str | Path], preset: str, need_gpu: bool = False,
                        required_free_bytes: int = 0, console: Optional[Console] = None) -> int:
    """The generic checks of `fwdata.doctor` plus the weights check; returns the exit code (0 or 1)."""
    opts = DoctorOptions(path=output, required_free_bytes=required_free_bytes, need_gpu=need_gpu, purpose="train",
                         extra_checks=[wan_weights_check(weights, preset)])
    return run_doctor(opts, console)
