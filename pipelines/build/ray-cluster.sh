#!/usr/bin/env bash
# `fwdata build` on a Ray cluster of several machines, started by hand (ssh), without Slurm.
#
#   on the head node:    pipelines/build/ray-cluster.sh head
#   on each worker node: HEAD=head-host pipelines/build/ray-cluster.sh worker
#   then, on the head:   pipelines/build/ray-cluster.sh build /shared/raw_videos /shared/fw_dataset
#   at the end, on every node: pipelines/build/ray-cluster.sh stop
#
# Every node needs the same checkout and environment (pip install -e .[ray]) and the same shared
# file system, mounted at the same path: the inputs and the dataset folder are read and written by
# the workers directly. Clips are Ray tasks: each asks for THREADS CPUs (and a GPU when the depth
# model runs on CUDA), so Ray runs as many clips on a node as its cores (and GPUs) allow. A node
# that dies loses only its clips in flight: run the same build command again to finish them.
# With Ray's token authentication on, every node and the driver need the same token (Ray docs:
# "token authentication").
set -euo pipefail
ROLE=${1:?usage: ray-cluster.sh head | worker | build VIDEOS DATASET [fwdata build options] | stop}
: "${PORT:=6379}"            # the head's GCS port
: "${THREADS:=1}"            # CPU threads per clip (fwdata build --threads; 1 = bit-reproducible)
: "${CPUS:=$(nproc)}"        # CPUs this node offers to Ray
RAY=${RAY:-ray}
case "$ROLE" in
  head)
    "$RAY" start --head --port "$PORT" --num-cpus "$CPUS" --disable-usage-stats ;;
  worker)
    "$RAY" start --address "${HEAD:?set HEAD to the host name of the head node}:$PORT" --num-cpus "$CPUS" \
        --disable-usage-stats ;;
  build)
    VIDEOS=${2:?videos folder}; DATASET=${3:?dataset folder}; shift 3
    # the driver runs on the head: it plans the clips, keeps the completion markers and writes
    # metadata.json once at the end; progress is printed here as for a local build
    fwdata build "$VIDEOS" --out "$DATASET" --executor ray --ray-address auto --threads "$THREADS" "$@" ;;
  stop)
    "$RAY" stop ;;
  *)
    echo "unknown role $ROLE (head | worker | build | stop)" >&2; exit 2 ;;
esac
