"""The [speed] flags on a GPU: `fwmodel bench` (its Python API, `fwmodel.bench.run_bench`) for both stages at the
sizes of issue 16, once per optimisation, each row adding one flag to the row before (cumulative).

    python tests/benchmarks/bench_speed_flags.py [--stages 1,2] [--steps 5] [--warmup 3] [--preset wan2.1-t2v-1.3b]
    python tests/benchmarks/bench_speed_flags.py --tiny          # the same loop at toy sizes on the CPU

Sizes: Stage 1 at 21 x 336 x 592, Stage 2 at 81 x 336 x 592, batch 1, bf16, random Wan weights (the bench's
synthetic inputs). Rows (docs/TRAINING.md "Speed flags"):

    baseline                today's defaults: attention auto, full activation checkpointing, fused AdamW on
                            CUDA, no compilation, DPT heads in the default layout
    foreach AdamW           the baseline with speed.fused_adamw = false (what fused AdamW saves; not cumulative)
    + attention flash       speed.attention_backend = "flash" (every SDPA call: ours and the Wan blocks')
    + DPT channels_last     speed.dpt_channels_last = true
    + compile blocks        speed.compile = "blocks" (regional torch.compile, inductor)
    + selective AC          speed.activation_checkpointing = "selective" (every 2nd block recomputed)
    + no AC                 speed.activation_checkpointing = "off" (OOM is reported as such)

Printed per stage: optimisation, step time (median of --steps after --warmup; the first warm-up step is eager
and records the SDPA kernels, compilation happens in the second: keep --warmup >= 2), MFU (model FLOPs counted
once per stage on the meta device, without recomputation, over the GPU's dense bf16 peak; fwmodel.bench), peak
memory (torch.cuda.max_memory_allocated) and the SDPA kernels that ran. Without CUDA (and without --tiny) it
says so and exits 0.

--tiny: preset tiny at 5 x 32 x 48 in fp32 on the CPU, 1 timed step, torch.compile's aot_eager backend
(FWMODEL_COMPILE_BACKEND, unless set), "flash" replaced by "math" (a CPU has no flash kernel): it checks that
every row's configuration runs, its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys

import torch

ROWS = [
    ("baseline", {}, False),
    ("foreach AdamW", {"fused_adamw": False}, False),  # not cumulative: against the baseline
    ("+ attention flash", {"attention_backend": "flash"}, True),
    ("+ DPT channels_last", {"dpt_channels_last": True}, True),
    ("+ compile blocks", {"compile": "blocks"}, True),
    ("+ selective AC", {"activation_checkpointing": "selective", "ac_every": 2}, True),
    ("+ no AC", {"activation_checkpointing": "off"}, True),
]
SIZES = {1: (21, 336, 592), 2: (81, 336, 592)}
TINY_SIZES = {1: (5, 32, 48), 2: (5, 32, 48)}


def row_configs(tiny: bool) -> list[tuple[str, dict]]:
    """(label, [speed] flags) per row: cumulative rows add to the last cumulative one; on the CPU (`tiny`)
    "flash" becomes "math"."""
    rows, current = [], {}
    for label, flags, cumulative in ROWS:
        speed = {**current, **flags}
        if cumulative:
            current = speed
        if tiny and speed.get("attention_backend") == "flash":
            speed = {**speed, "attention_backend": "math"}
        rows.append((label, speed))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--stages", default="1,2")
    p.add_argument("--preset", default="wan2.1-t2v-1.3b")
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--tiny", action="store_true", help="toy sizes on the CPU (checks the rows run)")
    args = p.parse_args(argv)

    from fwmodel.bench import count_model_flops, device_peak_tflops, run_bench
    from fwmodel.config import get_preset

    if not args.tiny and not torch.cuda.is_available():
        print("bench_speed_flags: needs a CUDA GPU (none here); nothing measured. --tiny runs the same loop at toy "
              "sizes on the CPU.")
        return 0
    if args.tiny:
        os.environ.setdefault("FWMODEL_COMPILE_BACKEND", "aot_eager")
        preset, sizes, device, precision, steps = "tiny", TINY_SIZES, "cpu", "no", 1
        torch.set_num_threads(1)
    else:
        preset, sizes, device, precision, steps = args.preset, SIZES, "cuda", "bf16", args.steps
    dev = torch.device(device)
    peak = device_peak_tflops(dev)
    print(f"device: {torch.cuda.get_device_name(dev) if dev.type == 'cuda' else 'cpu'}, preset {preset}, "
          f"{precision}, batch 1, torch {torch.__version__}, compile backend "
          f"{os.environ.get('FWMODEL_COMPILE_BACKEND', 'inductor')}")
    for stage in (int(s) for s in args.stages.split(",")):
        frames, height, width = sizes[stage]
        flops = count_model_flops(get_preset(preset), stage, 1, frames, height, width,
                                  "cpu" if args.tiny else "meta")
        print(f"\nStage {stage} at {frames} x {height} x {width}: {flops / 1e9:,.1f} model GFLOP per step")
        print(f"{'optimisation':<22} {'step time':>10} {'MFU':>7} {'memory':>10}  attention kernels / flags")
        for label, speed in row_configs(args.tiny):
            torch._dynamo.reset()
            try:
                r = run_bench(preset, stage, 1, frames, height, width, steps=steps, warmup=max(args.warmup, 2),
                              mixed_precision=precision, device=device, count_flops=False, echo=lambda s: None,
                              speed=speed)
            except torch.cuda.OutOfMemoryError:
                print(f"{label:<22} {'OOM':>10} {'':>7} {'':>10}  {speed}")
                continue
            finally:
                gc.collect()
                if dev.type == "cuda":
                    torch.cuda.empty_cache()
            mfu = f"{100 * flops / r.step_time_s / 1e12 / peak:.1f}%" if peak else "n/a"
            kernels = ", ".join(f"{k} x {n}" for k, n in sorted((r.attention_kernels or {}).items()))
            print(f"{label:<22} {r.step_time_s:>9.3f}s {mfu:>7} {r.peak_memory_gib:>6.2f} GiB  {kernels}; {speed}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
