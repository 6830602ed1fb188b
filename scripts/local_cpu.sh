#!/usr/bin/env bash
# Several processes of one training run on this machine, each with its own CPU device(s), talking
# through gloo: the multi-host code path (process-local data, global batches, checkpoints written
# by every process, the export by process 0) without a cluster.
#
#   scripts/local_cpu.sh N [python -m mmjax.train flags]
#   scripts/local_cpu.sh 2 --config=configs/tiny.py --config.mesh.fsdp=2 --workdir=workdirs/tiny_2proc
#
# The config's mesh must cover N x DEVICES_PER_PROCESS devices. Environment: DEVICES_PER_PROCESS
# (default 1), PORT (default: a free one). Process i logs to <workdir>/process_<i>.log; the script
# exits with the first non-zero exit status of the processes.
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:?usage: scripts/local_cpu.sh N [mmjax.train flags]}
shift
port=${PORT:-$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
workdir=workdirs/local_cpu
for arg in "$@"; do
  case $arg in --workdir=*) workdir=${arg#--workdir=} ;; esac
done
mkdir -p "$workdir"
export JAX_PLATFORMS=cpu
export XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}"
pids=()
for ((i = 0; i < n; i++)); do
  python -m mmjax.train --coordinator="127.0.0.1:$port" --num_processes="$n" --process_id="$i" \
    --workdir="$workdir" "$@" > "$workdir/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for ((i = 0; i < n; i++)); do
  rc=0
  wait "${pids[$i]}" || rc=$?
  if [ "$rc" -ne 0 ]; then
    echo "process $i exited with $rc; its log: $workdir/process_$i.log" >&2
    [ "$status" -ne 0 ] || status=$rc
  fi
done
[ "$status" -ne 0 ] || tail -n 3 "$workdir/process_0.log"
exit "$status"
