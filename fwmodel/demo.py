"""The training part of `make demo` (`fwmodel demo`): tiny Stage 1, then Stage 2 from its checkpoint.

Renders a small synthetic dataset (2 rooms, 9 frames, 64x96, true depth and cameras), writes tiny
random encoders, caches latents and text with the real `fwmodel cache` code, and runs the tiny
recipes in pipelines/train/ (random Wan backbone): the same commands as a real run, in seconds.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

import torch

RECIPES = Path(__file__).resolve().parents[1] / "pipelines" / "train"


def run_training_demo(out: Path, echo: Callable[[str], None] = print, quiet: bool = False) -> dict:
    """Train both stages on the tiny preset under `out`; returns the final checkpoint paths."""
    from fwdata.synth.dataset import SynthOptions, write_synthetic_dataset
    from fwmodel.cache import CacheOptions, build_cache, write_tiny_encoders
    from fwmodel.train import load_config, train

    recipes = {stage: RECIPES / f"tiny-stage{stage}.toml" for stage in (1, 2)}
    missing = [str(p) for p in recipes.values() if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"training recipes not found: {', '.join(missing)} (run from the repository)")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models run several times faster on one thread
    try:
        data = Path(out) / "train_data"
        write_synthetic_dataset(data, SynthOptions(num_scenes=2, num_frames=9, height=64, width=96, write_ply=False))
        encoders = write_tiny_encoders(Path(out) / "tiny_encoders")
        outputs = {stage: Path(out) / f"fantasy_world_stage{stage}" for stage in (1, 2)}
        for path in outputs.values():  # the demo starts over on every run
            shutil.rmtree(path, ignore_errors=True)

        stage1 = load_config(recipes[1], {"data.root": str(data), "train.output": str(outputs[1])})
        echo(f"caching latents and text with tiny random encoders ({stage1.data.clip_spec().key})")
        build_cache(CacheOptions(dataset=data, vae=encoders, text_encoder=encoders, data=stage1.data, device="cpu"))
        result1 = train(stage1, quiet=quiet, echo=echo)
        final1 = outputs[1] / f"step-{result1.step}.safetensors"

        stage2 = load_config(recipes[2], {"data.root": str(data), "train.output": str(outputs[2]),
                                          "model.init_from": str(final1)})
        result2 = train(stage2, quiet=quiet, echo=echo)
        final2 = outputs[2] / f"step-{result2.step}.safetensors"
    finally:
        torch.set_num_threads(threads)
    return {"stage1": final1, "stage2": final2, "dataset": data}
