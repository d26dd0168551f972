#!/usr/bin/env bash
# One node, 8 GPUs: data parallel over the trainable part (the frozen Wan backbone is replicated,
# outside DDP: no gradient sync, no optimizer state). torchrun sets RANK / WORLD_SIZE / LOCAL_RANK.
#
#   DATASET=/data/fw_dataset bash pipelines/train/launch-8gpu.sh 1
#   DATASET=/data/fw_dataset STAGE1_CHECKPOINT=outputs/fantasy_world_stage1/step-20000.safetensors \
#       bash pipelines/train/launch-8gpu.sh 2
#
# Global batch = batch_size x 8 x grad_accum: add e.g. --grad-accum 8 for the published 64.
# `accelerate launch --multi_gpu --num_processes 8 -m fwmodel.cli train ...` works the same way.
set -euo pipefail
STAGE=${1:?usage: launch-8gpu.sh 1|2 [extra fwmodel train options]}
shift
: "${DATASET:?set DATASET to the dataset folder}"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
EXTRA=()
if [ "$STAGE" = 2 ] && [ -n "${STAGE1_CHECKPOINT:-}" ]; then EXTRA+=(--init-from "$STAGE1_CHECKPOINT"); fi

torchrun --standalone --nproc_per_node "${NPROC:-8}" -m fwmodel.cli train \
    --stage "$STAGE" --config "stage${STAGE}" --data "$DATASET" "${EXTRA[@]}" "$@"
