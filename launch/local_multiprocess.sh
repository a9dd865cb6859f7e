#!/usr/bin/env bash
# N CPU processes on this machine, one CPU device each (gloo collectives), coordinating over 127.0.0.1:
# the multi-host code path without a cluster.
#
#   bash launch/local_multiprocess.sh [N] [WORKDIR] [-- extra star-elastic train args]
#   bash launch/local_multiprocess.sh 2 /tmp/mp-run -- --config.pretrain.steps=20
#
# Env: CONFIG (default configs/tiny.py), PORT (default: a free port), PYTHON (default: python),
#      DEVICES_PER_PROCESS (default 1). Logs: WORKDIR/logs/process_<i>.log; process 0 also prints to stdout.
set -euo pipefail

N="${1:-2}"
WORKDIR="${2:-/tmp/star-elastic-multiprocess}"
shift $(( $# >= 2 ? 2 : $# ))
[[ "${1:-}" == "--" ]] && shift
EXTRA=("$@")

PYTHON="${PYTHON:-python}"
CONFIG="${CONFIG:-configs/tiny.py}"
DEVICES_PER_PROCESS="${DEVICES_PER_PROCESS:-1}"
PORT="${PORT:-$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"

if ! [[ "$N" =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 [N>=1] [WORKDIR] [-- extra train args]" >&2
  exit 2
fi

cd "$(dirname "$0")/.."
mkdir -p "$WORKDIR/logs"
echo "launching $N processes (coordinator 127.0.0.1:$PORT, $DEVICES_PER_PROCESS CPU device(s) each) -> $WORKDIR"

pids=()
cleanup() {
  # JAX catches SIGTERM (preemption notifier): TERM, then KILL whatever is left
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  sleep 2
  for pid in "${pids[@]}"; do kill -9 "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

for (( i = 0; i < N; i++ )); do
  log="$WORKDIR/logs/process_$i.log"
  : >"$log"  # exists before `tail -f` below opens it (the background redirection is asynchronous)
  env JAX_PLATFORMS=cpu \
      XLA_FLAGS="--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS ${XLA_FLAGS:-}" \
      STAR_ELASTIC_COORDINATOR="127.0.0.1:$PORT" \
      STAR_ELASTIC_NUM_PROCESSES="$N" \
      STAR_ELASTIC_PROCESS_ID="$i" \
      "$PYTHON" -m star_elastic_jax.launcher -- \
      train --config "$CONFIG" --workdir "$WORKDIR" --no-progress "${EXTRA[@]}" >"$log" 2>&1 &
  pids+=($!)
done

tail -n +1 -f "$WORKDIR/logs/process_0.log" &
tail_pid=$!
pids+=("$tail_pid")

status=0
for (( i = 0; i < N; i++ )); do
  if ! wait "${pids[$i]}"; then
    echo "process $i failed (see $WORKDIR/logs/process_$i.log)" >&2
    status=1
    break
  fi
done
kill "$tail_pid" 2>/dev/null || true
exit "$status"
