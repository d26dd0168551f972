"""The packaged training recipes (`fwmodel train --config NAME`, `fwmodel cache --config NAME`).

`stage1` / `stage2` are the full Wan2.1 recipes, `tiny-stage1` / `tiny-stage2` their toy-size
versions for the demo and CI. Found by name or path with `fwdata.presets.find_preset` (the one
lookup of every preset kind); `fwmodel recipes` lists them.
"""

from __future__ import annotations

from pathlib import Path

from fwdata.presets import PresetKind

RECIPES = PresetKind("training recipe", Path(__file__).resolve().parent, "fwmodel recipes")
