#!/usr/bin/env bash
# Install star-elastic-jax (with the torch extra) into .venv and run the main job,
# `star-elastic demo`. Extra arguments are passed to the demo command.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/_venv.sh
source scripts/_venv.sh
ensure_venv torch

echo ">> running: star-elastic demo $*"
exec "$VENV_DIR/bin/star-elastic" demo "$@"
