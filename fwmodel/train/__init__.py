"""The trainer, in parts as torchtitan separates them (each module has one job; `loop` reads top to bottom):

    config        TrainConfig (one pydantic section per TOML table), recipes, the resume hash
    distributed   process group and `Dist` (rank, world size, device)
    parallel      the parallel strategy (train.parallel): DDP, or FSDP2 sharding with consolidated checkpoints
    speed         the [speed] flags: attention backend, regional compile, activation checkpointing, ...
    model         the model to train (preset, Wan weights, Stage-1 / release initialisation)
    step          AdamW + LR schedule and `train_step` (shared with `fwmodel bench`)
    state         checkpoints and resumable states with their manifests
    log           train.log, metrics.jsonl, TensorBoard
    loop          data, preflight and the loop: `train(cfg)`

`from fwmodel.train import train` is the entry point (`fwmodel train` calls it).
"""

from fwmodel.train.loop import TrainingAborted, TrainResult, make_loader, prepare_data, resolve_threads, train

__all__ = ["TrainResult", "TrainingAborted", "make_loader", "prepare_data", "resolve_threads", "train"]
