#!/usr/bin/env bash
# Starts N processes of one command on this machine, wired together as one
# jax.distributed run over loopback (a multi-host run, simulated on CPU).
#
#   launch/local.sh N CMD [ARGS...]
#   e.g. launch/local.sh 2 python -m saemnesia_jax.evaluate --config configs/canvas_mini.py
#
# Each process i gets SAEMNESIA_COORDINATOR=127.0.0.1:PORT,
# SAEMNESIA_NUM_PROCESSES=N and SAEMNESIA_PROCESS_ID=i, which
# saemnesia_jax.units.initialize_distributed() reads. Also set, unless already
# set: JAX_PLATFORMS=cpu and XLA_FLAGS=--xla_force_host_platform_device_count=D
# (D = SAEMNESIA_LOCAL_DEVICES, default 1 fake device per process).
#
# Options (environment):
#   SAEMNESIA_PORT      coordinator port (default: a free port picked now)
#   SAEMNESIA_LOG_DIR   folder of the logs process_<i>.log
#                       (default launch_logs/local-<date>-<pid>)
#   SAEMNESIA_LOCAL_DEVICES  fake CPU devices per process (default 1)
#
# Waits for every process. If one fails, the others are stopped, the tail of
# the failed log is printed, and the script exits with that process's status.
set -euo pipefail

usage() { echo "usage: $0 N CMD [ARGS...]   (N >= 1 processes of CMD)" >&2; exit 2; }
[[ $# -ge 2 ]] || usage
N=$1; shift
[[ $N =~ ^[1-9][0-9]*$ ]] || { echo "$0: N must be a positive integer, got '$N'" >&2; usage; }

PYTHON=${PYTHON:-python3}
if [[ -n ${SAEMNESIA_PORT:-} ]]; then
  PORT=$SAEMNESIA_PORT
else
  # Ask the OS for a free port; it is released at once and bound again by
  # process 0's coordinator a moment later (set SAEMNESIA_PORT to choose).
  PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()')
fi
LOG_DIR=${SAEMNESIA_LOG_DIR:-launch_logs/local-$(date +%Y%m%d-%H%M%S)-$$}
mkdir -p "$LOG_DIR"

export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
if [[ ${XLA_FLAGS:-} != *xla_force_host_platform_device_count* ]]; then
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=${SAEMNESIA_LOCAL_DEVICES:-1}"
fi
export SAEMNESIA_COORDINATOR=127.0.0.1:$PORT
export SAEMNESIA_NUM_PROCESSES=$N
unset SAEMNESIA_AUTO_DISTRIBUTED

pids=()
stop_all() {
  local p
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
}
trap 'stop_all; exit 130' INT TERM

echo "local.sh: $N processes, coordinator $SAEMNESIA_COORDINATOR, logs in $LOG_DIR" >&2
for ((i = 0; i < N; i++)); do
  SAEMNESIA_PROCESS_ID=$i "$@" >"$LOG_DIR/process_$i.log" 2>&1 &
  pids+=($!)
done

# Poll rather than `wait -n`, so that the failing process is known and the
# others can be stopped at once (they would otherwise block in a collective).
declare -A running
for ((i = 0; i < N; i++)); do running[$i]=1; done
status=0
while ((${#running[@]} > 0)); do
  for i in "${!running[@]}"; do
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      rc=0
      wait "${pids[$i]}" || rc=$?
      unset "running[$i]"
      if ((rc != 0 && status == 0)); then
        status=$rc
        echo "local.sh: process $i exited with status $rc; stopping the others. Tail of $LOG_DIR/process_$i.log:" >&2
        tail -n 20 "$LOG_DIR/process_$i.log" >&2 || true
        stop_all
      fi
    fi
  done
  if ((${#running[@]} > 0)); then sleep 0.2; fi
done
if ((status == 0)); then
  echo "local.sh: all $N processes finished; logs in $LOG_DIR" >&2
fi
exit "$status"
