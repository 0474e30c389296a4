#!/bin/bash
# The DeepSpeed launcher for fisherdist. Arguments: a fisherdist command line.
#   NPROC_PER_NODE=2 launch/deepspeed.sh fisher configs/fisher/tiny.yaml dist.backend=zero2    # one node
#   HOSTFILE=hosts launch/deepspeed.sh fisher ...        # multi-node: "<host> slots=<gpus>" lines, pdsh/ssh fan-out
#   HOSTFILE=hosts LAUNCHER=slurm launch/deepspeed.sh ...  # inside a Slurm allocation: srun instead of ssh
# Env: HOSTFILE, NPROC_PER_NODE (one node without a hostfile), MASTER_ADDR, MASTER_PORT (29500), LAUNCHER, FISHERDIST_MODULE.
set -euo pipefail
ARGS=(--no_local_rank --master_port "${MASTER_PORT:-29500}")  # fisherdist reads LOCAL_RANK from the env
[ -n "${MASTER_ADDR:-}" ] && ARGS+=(--master_addr "$MASTER_ADDR")
if [ -n "${HOSTFILE:-}" ]; then
  ARGS+=(--hostfile "$HOSTFILE" --launcher "${LAUNCHER:-pdsh}")
  [ "${LAUNCHER:-pdsh}" = slurm ] && ARGS+=(--no_ssh_check --launcher_args=--kill-on-bad-exit=1)
else
  ARGS+=(--num_gpus "${NPROC_PER_NODE:-$(python -c 'import torch; print(max(1, torch.cuda.device_count()))')}")
fi
exec deepspeed "${ARGS[@]}" "$(python -m fisherdist.distributed.slurm script-path "${FISHERDIST_MODULE:-fisherdist}")" "$@"
