#!/usr/bin/env bash
# Run a dmd_jax job on GPUs.
#
#   launch/gpu.sh --config configs/demo.py:pipeline --workdir runs/demo
#
# One host: every visible GPU joins the `data` mesh; nothing else is needed. Several hosts
# under SLURM (or Open MPI): start this script once per host (e.g. `srun launch/gpu.sh ...`);
# DMD_DISTRIBUTED=auto lets jax.distributed.initialize() read the cluster from the
# environment. For hosts started by hand, set DMD_COORDINATOR=host:port,
# DMD_NUM_PROCESSES and DMD_PROCESS_ID instead. Installs the CUDA extra on first use.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ ! -f .venv/.installed-cuda ]; then
  python3 -m venv .venv
  .venv/bin/pip install -q -U pip
  .venv/bin/pip install -q -e '.[cuda]'
  touch .venv/.installed-cuda
fi
if [ -n "${SLURM_JOB_ID:-}${OMPI_COMM_WORLD_SIZE:-}" ] && [ -z "${DMD_COORDINATOR:-}" ]; then
  export DMD_DISTRIBUTED=auto
fi
exec .venv/bin/python -m dmd_jax.main "$@"
