"""`make demo` (`fwmodel demo`): the main job end to end, one story on one dataset, offline.

    1/6 render    synthetic clips with true depth and cameras (`fwdata synth`)
    2/6 build     `fwdata build` on their videos; depth from `random-tiny`, a randomly initialised
                  Depth Anything (no download): the pipeline runs for real, the depth is not real
    3/6 compare   the built cameras against the truth (`fwdata compare`)
    4/6 validate  `fwdata validate` with the demo's gate file (OUT/demo-gates.toml): the default gates
                  plus the one allowance the random depth model needs (`allow_random_init_models`);
                  if validation fails the demo stops there with exit 1 and the reason (`DemoFailed`)
    5/6 cache     `fwmodel cache` of the built dataset with `random-tiny` VAE and UMT5
    6/6 train     tiny Stage 1, then Stage 2 from its checkpoint, both on the built dataset (the
                  packaged `tiny-stage1` / `tiny-stage2` recipes, random Wan backbone)

Every step is the code of the command it names; the console says which command each step equals.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

# The demo's gate file, written to OUT/demo-gates.toml: every key it does not set is the default.
DEMO_GATES = """\
# The gate file of `fwmodel demo`: the default gates, plus one allowance. The demo's depth and point
# labels come from `random-tiny`, a randomly initialised depth model (offline, no download), so they
# are not real; this file accepts them (gate.random_init_model becomes a warning), for the demo only.
# Real datasets are validated with the default or strict gates, which refuse such labels.
name = "demo"
description = "default gates + labels from a randomly initialised depth model allowed (the demo only)"

[dataset]
allow_random_init_models = true
"""
ALLOWANCE = ("the labels come from random-tiny, a randomly initialised depth model, so they are not real: "
             "allowed for the demo only (the default and strict gates refuse them)")


class DemoFailed(RuntimeError):
    """A step of the demo failed (the message says which and why); `fwmodel demo` exits 1."""


@dataclass(frozen=True)
class DemoPlan:
    """Sizes of the demo: rendered clips, and the clips the build cuts from them."""

    scenes: int = 4
    frames: int = 33                # rendered frames per clip
    height: int = 192
    width: int = 336
    path_kinds: Optional[Sequence[str]] = None  # None: orbit, forward, pan, rotate
    clip_frames: int = 17           # the build takes 17 frames every 2nd frame
    clip_stride: int = 2


@dataclass
class DemoResult:
    truth: Path
    dataset: Path
    gates: Path
    validation_code: int
    cache: Path
    stage1: Path
    stage2: Path
    train_data: dict = field(default_factory=dict)  # stage -> the data.root it trained on


DEFAULT_PLAN = DemoPlan()


def run_demo(out: Path, console, quiet: bool = False, plan: Optional[DemoPlan] = None,
             gates_text: Optional[str] = None) -> DemoResult:
    """Render, build, compare, validate, cache and train under `out`; raises DemoFailed on a failed step.

    `plan` (default DEFAULT_PLAN) sets the sizes, `gates_text` (default DEMO_GATES) the gate file."""
    plan = plan or DEFAULT_PLAN
    gates_text = DEMO_GATES if gates_text is None else gates_text
    from fwdata.build.cli import run_demo_build
    from fwdata.cli import print_dataset_summary
    from fwdata.compare import compare_datasets
    from fwdata.compare_text import DEPTH_COLUMNS, print_compare
    from fwdata.dataset.contract import ContractError, load_metadata
    from fwdata.synth.dataset import SynthOptions, write_synthetic_dataset
    from fwdata.validate import ValidateOptions
    from fwdata.validate.report import ReportFormat, validate_and_report

    out = Path(out)
    say = lambda text: console.print(text, highlight=False, soft_wrap=True)  # noqa: E731

    # ---- 1 render
    kinds = list(plan.path_kinds) if plan.path_kinds else None
    say(f"[bold]1/6 render[/]: {plan.scenes} synthetic clips with ground truth ({plan.frames} frames, "
        f"{plan.height}x{plan.width}; `fwdata synth`)")
    truth = out / "synthetic"
    opts = SynthOptions(num_scenes=plan.scenes, num_frames=plan.frames, height=plan.height, width=plan.width,
                        **({"path_kinds": kinds} if kinds else {}))
    write_synthetic_dataset(truth, opts, progress=None if quiet else (lambda sid: say(f"  {sid}")))
    try:
        print_dataset_summary(truth, load_metadata(truth))
    except ContractError as e:
        raise DemoFailed(f"render: {e}") from None

    # ---- 2 build
    dataset = out / "dataset"
    say(f"[bold]2/6 build[/]: `fwdata build {truth / 'videos'} --out {dataset}` (depth model random-tiny: "
        "randomly initialised, so the depth is not real)")
    built = run_demo_build(truth / "videos", dataset, console, quiet=quiet, frames=plan.clip_frames,
                           height=plan.height, width=plan.width, stride=plan.clip_stride)
    if not built.metadata.samples:
        raise DemoFailed(f"build: no sample was built in {dataset} (the failures are listed above)")

    # ---- 3 compare
    say(f"[bold]3/6 compare[/]: `fwdata compare {dataset} --truth {truth}` (the depth is random here, so only "
        "the cameras)")
    accuracy, _ = compare_datasets(dataset, truth)
    # the table `fwdata compare` prints (fits 80 columns), its cameras table only
    print_compare(accuracy.drop(columns=[c for c, _ in DEPTH_COLUMNS if c in accuracy]), console)

    # ---- 4 validate
    gates = out / "demo-gates.toml"
    gates.write_text(gates_text)
    say(f"[bold]4/6 validate[/]: `fwdata validate {dataset} --gates {gates}`: the default gates plus "
        f"allow_random_init_models = true, because {ALLOWANCE}")
    code = validate_and_report(ValidateOptions(dataset=dataset, gates=gates, workers=0), ReportFormat.table,
                               quiet=quiet, console=console)
    if code != 0:
        why = "the dataset could not be read" if code == 2 else "the built dataset does not pass the gates"
        raise DemoFailed(f"validation of {dataset} failed (exit {code}): {why} (findings above); nothing was "
                         f"cached or trained. Rerun it with: fwdata validate {dataset} --gates {gates}")

    # ---- 5 cache, 6 train: on the dataset just built and validated
    trained = run_training(dataset, out, console, quiet=quiet)
    say(f"[green]demo finished[/]: ground truth {truth}; built dataset {dataset} (compared with the truth, "
        f"validation passed with {gates}); both stages trained on {dataset}: Stage-1 weights {trained['stage1']}, "
        f"Stage-2 weights {trained['stage2']}")
    return DemoResult(truth=truth, dataset=dataset, gates=gates, validation_code=code, cache=trained["cache"],
                      stage1=trained["stage1"], stage2=trained["stage2"], train_data=trained["train_data"])


def run_training(dataset: Path, out: Path, console, quiet: bool = False) -> dict:
    """Steps 5 and 6: cache `dataset` with random-tiny encoders, train tiny Stage 1 then Stage 2 on it.

    Returns the cache folder, the final checkpoint of each stage and the data.root each stage used."""
    from fwmodel.cache import CacheOptions, build_cache
    from fwmodel.config import get_preset
    from fwmodel.progress import StepProgress, cache_summary
    from fwmodel.train import train
    from fwmodel.train.config import load_config, resolve_recipe

    out, dataset = Path(out), Path(dataset)
    recipes = {stage: resolve_recipe(f"tiny-stage{stage}") for stage in (1, 2)}  # packaged: works from any folder
    outputs = {stage: out / f"fantasy_world_stage{stage}" for stage in (1, 2)}
    for path in outputs.values():  # the demo's training starts over on every run
        shutil.rmtree(path, ignore_errors=True)
    mode = "off" if quiet else ("bar" if console.is_terminal else "lines")  # as fwmodel.progress.choose_mode
    echo = lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True)  # noqa: E731

    stage1 = load_config(recipes[1], {"data.root": str(dataset), "train.output": str(outputs[1])})
    console.print(f"[bold]5/6 cache[/]: `fwmodel cache {dataset} --config tiny-stage1 --vae random-tiny "
                  f"--text-encoder random-tiny` (tiny randomly initialised VAE and UMT5; "
                  f"{stage1.data.clip_spec().key}, the same clips for both tiny recipes)", highlight=False,
                  soft_wrap=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny encoders run several times faster on one thread
    meter = StepProgress("caching", 0, "sample", mode, echo=echo, console=console)
    try:
        cache = build_cache(CacheOptions(dataset=dataset, vae=Path("random-tiny"), text_encoder=Path("random-tiny"),
                                         data=stage1.data, device="cpu",
                                         text_dim=get_preset(stage1.model.preset).wan.text_dim),
                            meter.item_callback())
    finally:
        meter.close()
        torch.set_num_threads(threads)
    echo(f"latent cache ready: {cache} ({cache_summary(meter)})")

    console.print(f"[bold]6/6 train[/]: tiny Stage 1, then Stage 2 from its checkpoint, on {dataset} "
                  f"(`fwmodel train --stage N --config tiny-stageN --data {dataset}`; random tiny Wan; see "
                  "docs/TRAINING.md)", highlight=False, soft_wrap=True)
    result1 = train(stage1, quiet=quiet, echo=echo, progress_mode=mode, console=console)
    final1 = outputs[1] / f"step-{result1.step}.safetensors"
    stage2 = load_config(recipes[2], {"data.root": str(dataset), "train.output": str(outputs[2]),
                                      "model.init_from": str(final1)})
    result2 = train(stage2, quiet=quiet, echo=echo, progress_mode=mode, console=console)
    final2 = outputs[2] / f"step-{result2.step}.safetensors"
    return {"cache": cache, "stage1": final1, "stage2": final2,
            "train_data": {1: Path(stage1.data.root), 2: Path(stage2.data.root)}}
