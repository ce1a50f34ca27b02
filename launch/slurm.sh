#!/usr/bin/env bash
# One process per node under SLURM, wired together as one jax.distributed run.
#
#   sbatch launch/slurm.sh CMD [ARGS...]
#   e.g. sbatch --nodes=4 launch/slurm.sh python -m saemnesia_jax.evaluate --config configs/sd15.py
#
# A template: adapt the #SBATCH lines (partition, GPUs, time) to the cluster;
# options given to sbatch on the command line override them. srun starts one
# task per node; each task exports
#   SAEMNESIA_COORDINATOR   = <first node of SLURM_JOB_NODELIST>:PORT
#   SAEMNESIA_NUM_PROCESSES = SLURM_NTASKS
#   SAEMNESIA_PROCESS_ID    = SLURM_PROCID
# which saemnesia_jax.units.initialize_distributed() reads. PORT is
# SAEMNESIA_PORT, or 20000 + (SLURM_JOB_ID mod 20000) so that two jobs
# sharing a node do not collide.
#
#SBATCH --job-name=saemnesia
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --output=saemnesia-%j.out
##SBATCH --gpus-per-node=8
##SBATCH --partition=gpu
set -euo pipefail

if [[ $# -lt 1 ]]; then
  echo "usage: sbatch $0 CMD [ARGS...]" >&2
  exit 2
fi
: "${SLURM_JOB_NODELIST:?not inside a SLURM allocation: submit with sbatch (or run inside salloc)}"

# sed reads all of its input: `head -n 1` can close the pipe early and,
# under pipefail, fail the script with SIGPIPE.
HEAD=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | sed -n 1p)
PORT=${SAEMNESIA_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
export SAEMNESIA_COORDINATOR=$HEAD:$PORT
unset SAEMNESIA_AUTO_DISTRIBUTED
echo "slurm.sh: coordinator $SAEMNESIA_COORDINATOR, nodes $SLURM_JOB_NODELIST" >&2

# SLURM_PROCID and SLURM_NTASKS differ per task and step: read them inside
# the task. --kill-on-bad-exit stops every task when one fails (the others
# would otherwise block in a collective).
srun --ntasks-per-node=1 --kill-on-bad-exit=1 bash -c '
  export SAEMNESIA_PROCESS_ID=$SLURM_PROCID SAEMNESIA_NUM_PROCESSES=$SLURM_NTASKS
  exec "$@"' saemnesia-task "$@"
