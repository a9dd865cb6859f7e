#!/usr/bin/env bash
# Star Elastic training on a Cloud TPU pod slice: the same command on every TPU VM host (one JAX process
# per host); jax.distributed.initialize() detects the pod (worker id, hosts, coordinator) from the VM
# metadata, so no STAR_ELASTIC_* variables are needed.
#
#   TPU_NAME=my-v5p-128 ZONE=us-east5-a bash launch/tpu_train.sh setup      # clone + install on every host
#   TPU_NAME=my-v5p-128 ZONE=us-east5-a bash launch/tpu_train.sh train [--config.mesh.fsdp=16 ...]
#   TPU_NAME=my-v5p-128 ZONE=us-east5-a bash launch/tpu_train.sh logs | stop
#
# Env: TPU_NAME, ZONE, PROJECT (default: gcloud's), REPO (git URL), BRANCH, CONFIG (default
# configs/nano_v3_30b.py), WORKDIR (a gs:// bucket or a shared path: every host writes its shards of the
# checkpoint there).
set -euo pipefail

CMD="${1:-}"
shift || true
: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
REPO="${REPO:-https://github.com/your-org/star_elastic_jax.git}"
BRANCH="${BRANCH:-main}"
CONFIG="${CONFIG:-configs/nano_v3_30b.py}"
WORKDIR="${WORKDIR:-gs://your-bucket/star-elastic/nano}"
PROJECT_FLAG=()
[[ -n "${PROJECT:-}" ]] && PROJECT_FLAG=(--project "$PROJECT")

ssh_all() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" "${PROJECT_FLAG[@]}" --worker=all --command="$1"
}

quote_args() {
  local out="" a
  for a in "$@"; do out+=" $(printf '%q' "$a")"; done
  printf '%s' "$out"
}

case "$CMD" in
  setup)
    ssh_all "set -e; if [ ! -d star_elastic_jax ]; then git clone -b $BRANCH $REPO star_elastic_jax; fi; \
cd star_elastic_jax && git fetch && git checkout $BRANCH && git pull --ff-only && \
python3 -m venv ~/venv && ~/venv/bin/pip install -U pip && ~/venv/bin/pip install 'jax[tpu]==0.10.2' && \
~/venv/bin/pip install -e ."
    ;;
  train)
    extra="$(quote_args "$@")"
    ssh_all "cd star_elastic_jax && nohup ~/venv/bin/python -m star_elastic_jax.launcher -- \
train --config $CONFIG --workdir $WORKDIR --no-progress$extra > ~/star-elastic.log 2>&1 & echo \$! > ~/star-elastic.pid"
    ;;
  logs)
    ssh_all "tail -n 20 ~/star-elastic.log"
    ;;
  stop)
    ssh_all 'if [ -f ~/star-elastic.pid ]; then kill "$(cat ~/star-elastic.pid)" || true; rm -f ~/star-elastic.pid; fi'
    ;;
  *)
    echo "usage: TPU_NAME=... ZONE=... $0 {setup|train [overrides...]|logs|stop}" >&2
    exit 2
    ;;
esac
