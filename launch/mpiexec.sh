#!/bin/bash
# mpiexec / mpirun for fisherdist: ranks come from mpi4py (fisherdist.distributed.init_distributed), rank 0 broadcasts
# MASTER_ADDR/MASTER_PORT. Arguments: a fisherdist command line.
#   NPROC=2 launch/mpiexec.sh fisher configs/fisher/tiny.yaml dist.backend=ddp
#   NPROC=16 MPI_HOSTS=node0:8,node1:8 MASTER_ADDR=node0 launch/mpiexec.sh fisher ...
# Env: NPROC (2), MPI_HOSTS (mpich -hosts list), MPIEXEC (mpiexec from PATH; must match mpi4py's MPI), FISHERDIST_MODULE.
set -euo pipefail
exec "${MPIEXEC:-mpiexec}" -n "${NPROC:-2}" ${MPI_HOSTS:+-hosts "$MPI_HOSTS"} \
  python -m "${FISHERDIST_MODULE:-fisherdist}" "$@"
