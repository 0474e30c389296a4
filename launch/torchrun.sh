#!/bin/bash
# torchrun for fisherdist, single- or multi-node (c10d rendezvous). Arguments: a fisherdist command line.
#   launch/torchrun.sh fisher configs/fisher/tiny.yaml dist.backend=fsdp2             # one node, all GPUs (or 1 CPU proc)
#   NPROC_PER_NODE=2 launch/torchrun.sh fisher configs/fisher/tiny.yaml dist.backend=fsdp2
#   NNODES=2 RDZV_ENDPOINT=node0:29500 launch/torchrun.sh fisher ...                     # run the same line on every node
# Env: NNODES (1), NPROC_PER_NODE (GPU count, else 1), RDZV_ENDPOINT (needed for NNODES>1), RDZV_ID (fisherdist),
#      RDZV_CONF (e.g. is_host=1 on the node that hosts the store when nodes share a hostname), FISHERDIST_MODULE.
# SIGUSR1 is forwarded to the workers (fisherdist.distributed.preempt): they checkpoint and exit with status 75.
set -euo pipefail
NPROC_PER_NODE=${NPROC_PER_NODE:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}
if [ "${NNODES:-1}" = 1 ] && [ -z "${RDZV_ENDPOINT:-}" ]; then
  RDZV=(--standalone)
else
  RDZV=(--nnodes "${NNODES:-1}" --rdzv_backend c10d --rdzv_endpoint "${RDZV_ENDPOINT:?set RDZV_ENDPOINT=host:port}"
        --rdzv_id "${RDZV_ID:-fisherdist}" ${RDZV_CONF:+--rdzv_conf "$RDZV_CONF"})
fi
exec python -m fisherdist.distributed.preempt torchrun "${RDZV[@]}" --nproc_per_node "$NPROC_PER_NODE" --max_restarts 0 \
  -m "${FISHERDIST_MODULE:-fisherdist}" "$@"
