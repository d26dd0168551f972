#!/usr/bin/env bash
# Several nodes (e.g. 8 nodes x 8 GPUs = 64, the published Stage-1 run). Run this on every node
# with the same MASTER_ADDR; NODE_RANK 0..NNODES-1. OUTPUT must be on a filesystem all nodes share
# (each rank writes its RNG state next to the checkpoint; rank 0 writes the weights).
#
#   NNODES=8 NODE_RANK=$i MASTER_ADDR=node0 DATASET=/shared/fw_dataset \
#       bash pipelines/train/launch-multinode.sh 1 --output /shared/outputs/fantasy_world_stage1
#
# Under SLURM see slurm-stage.sbatch. Resume after a failure with the same command plus --resume.
set -euo pipefail
STAGE=${1:?usage: launch-multinode.sh 1|2 [extra fwmodel train options]}
shift
: "${DATASET:?set DATASET}" "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
EXTRA=()
if [ "$STAGE" = 2 ] && [ -n "${STAGE1_CHECKPOINT:-}" ]; then EXTRA+=(--init-from "$STAGE1_CHECKPOINT"); fi

torchrun --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "${NPROC_PER_NODE:-8}" \
    --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id "fw-stage${STAGE}" \
    -m fwmodel.cli train --stage "$STAGE" --config "stage${STAGE}" --data "$DATASET" \
    "${EXTRA[@]}" "$@"
