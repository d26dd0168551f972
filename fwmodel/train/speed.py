"""The [speed] flags of the trainer (`SpeedSection`, docs/TRAINING.md "Speed flags"), shared by `fwmodel train`
and `fwmodel bench`:

    check_speed(cfg, device)            # a flag this device cannot run: ConfigError (one line), before any work
    apply_speed(model, cfg, device)     # model-side flags on the unwrapped model, before DDP/FSDP2 and the optimizer:
                                        # activation checkpointing, channels_last DPT heads, regional compilation
    with attention_context(cfg): ...    # forward and backward on speed.attention_backend's SDPA kernel

`fwmodel.train.step.train_step` runs its forward and backward in `attention_context` and records, on the
first micro-batch, which SDPA kernels ran (`RecordAttention`); `build_optimizer` reads speed.fused_adamw.
None of the flags changes the trajectory beyond float tolerance (tests/train/test_speed_flags.py).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Optional

import torch

from fwmodel.train.config import ConfigError, TrainConfig, checkpointing_mode


# torch.compile backend of speed.compile = "blocks". Tests set FWMODEL_COMPILE_BACKEND=aot_eager (no C compiler
# needed, same maths); the trainer uses inductor.
COMPILE_BACKEND_ENV = "FWMODEL_COMPILE_BACKEND"


def _sdpa_backends(name: str) -> Optional[list]:
    from torch.nn.attention import SDPBackend

    return {"auto": None, "flash": [SDPBackend.FLASH_ATTENTION], "cudnn": [SDPBackend.CUDNN_ATTENTION],
            "efficient": [SDPBackend.EFFICIENT_ATTENTION], "math": [SDPBackend.MATH]}[name]


def attention_context(cfg: TrainConfig):
    """The context the forward and backward run in: `torch.nn.attention.sdpa_kernel` restricted to
    speed.attention_backend (nothing for "auto"). It covers every attention of the model: ours call
    F.scaled_dot_product_attention, and the Wan blocks too through diffusers' default "native" attention
    backend (`dispatch_attention_fn`)."""
    from torch.nn.attention import sdpa_kernel

    backends = _sdpa_backends(cfg.speed.attention_backend)
    return nullcontext() if backends is None else sdpa_kernel(backends)


def check_speed(cfg: TrainConfig, device: torch.device) -> None:
    """ConfigError (one line) for speed flags `device` cannot run."""
    backend = cfg.speed.attention_backend
    if device.type != "cuda" and backend not in ("auto", "math"):
        raise ConfigError(f"speed.attention_backend = {backend!r} needs a CUDA GPU; on {device.type} use "
                          "\"auto\" or \"math\"")
    if backend in ("flash", "cudnn") and cfg.model.mixed_precision != "bf16":
        raise ConfigError(f"speed.attention_backend = {backend!r} runs in bf16 only: set model.mixed_precision = "
                          "\"bf16\", or use \"efficient\", \"math\" or \"auto\" for fp32")


def apply_speed(model, cfg: TrainConfig, device: torch.device) -> list[str]:
    """Set the model-side speed flags on an unwrapped FantasyWorldModel (before DDP / FSDP2 wrapping and
    before the optimizer): activation checkpointing, channels_last DPT heads, regional compilation.
    Returns one log line per setting."""
    check_speed(cfg, device)
    sp = cfg.speed
    model.ac_every = sp.ac_every
    model.activation_checkpointing = checkpointing_mode(cfg)
    for head in (model.geometry.depth_head, model.geometry.point_head):
        head.channels_last = sp.dpt_channels_last
    ac = model.activation_checkpointing + (f" (every {sp.ac_every}th block, DPT chunks)"
                                           if model.activation_checkpointing == "selective" else "")
    from fwmodel.train.step import fused_adamw

    fused = fused_adamw(cfg, device)
    lines = [f"speed: attention {sp.attention_backend}, activation checkpointing {ac}, "
             f"DPT channels_last {'on' if sp.dpt_channels_last else 'off'}, AdamW {'fused' if fused else 'foreach'}, "
             f"compile {sp.compile}"]
    if sp.compile == "blocks":
        import os

        backend = os.environ.get(COMPILE_BACKEND_ENV, "inductor")
        lines.append(f"compile ({backend}, dynamic=False): " + ", ".join(model.compile_blocks(backend)))
    return lines


# aten kernels behind F.scaled_dot_product_attention (the math path decomposes into matmuls: no kernel of its own)
_SDPA_KERNELS = {
    "_scaled_dot_product_flash_attention": "flash", "_scaled_dot_product_flash_attention_for_cpu": "flash (CPU)",
    "_scaled_dot_product_cudnn_attention": "cudnn", "_scaled_dot_product_efficient_attention": "efficient",
    "_scaled_dot_product_fused_attention_overrideable": "fused (overrideable)",
}


class RecordAttention:
    """Counts the SDPA calls in a region and the fused kernel each ran (`counts`: kernel -> calls; the
    calls no fused kernel took are "math"). A torch function mode sees the calls, a dispatch mode the kernels."""

    def __init__(self):
        from torch.overrides import TorchFunctionMode
        from torch.utils._python_dispatch import TorchDispatchMode

        record = self
        self.calls, self.counts = 0, {}

        class Calls(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                if func is torch.nn.functional.scaled_dot_product_attention:
                    record.calls += 1
                return func(*args, **(kwargs or {}))

        class Kernels(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = _SDPA_KERNELS.get(func.overloadpacket.__name__)
                if name is not None:
                    record.counts[name] = record.counts.get(name, 0) + 1
                return func(*args, **(kwargs or {}))

        self._modes = (Calls(), Kernels())

    def __enter__(self):
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc):
        for mode in reversed(self._modes):
            mode.__exit__(*exc)

    def summary(self) -> dict[str, int]:
        fused = sum(self.counts.values())
        return {**self.counts, **({"math": self.calls - fused} if self.calls > fused else {})}


def eager(on: bool):
    """Compiled blocks run eagerly inside (torch.compiler.set_stance "force_eager") when `on`."""
    return torch.compiler.set_stance("force_eager") if on else nullcontext()
