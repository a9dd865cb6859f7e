# shellcheck shell=bash
# Shared by scripts/test.sh and scripts/demo.sh (sourced, not run): create the repo-local
# virtualenv if absent and install this package into it with one extra.
#
#   source scripts/_venv.sh && ensure_venv test     # sets VENV_DIR and VENV_PY
#
# Environment knobs: PYTHON (interpreter used to create the venv; default python3.11, else
# python3), STAR_ELASTIC_VENV (venv location; default <repo>/.venv).

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV_DIR="${STAR_ELASTIC_VENV:-$REPO_ROOT/.venv}"
VENV_PY="$VENV_DIR/bin/python"

_die() {
  echo "ERROR: $*" >&2
  exit 1
}

_python_ok() {  # is "$1" a Python >= 3.11?
  "$1" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1
}

_pick_python() {
  local candidate
  for candidate in ${PYTHON:-} python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 && _python_ok "$candidate"; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

ensure_venv() {
  local extra="$1"
  if [[ ! -x "$VENV_PY" ]]; then
    local py
    py="$(_pick_python)" || _die "need Python >= 3.11 (tried: ${PYTHON:+$PYTHON }python3.11 python3); set PYTHON=/path/to/python3.11"
    echo ">> creating virtualenv $VENV_DIR with $py ($("$py" --version 2>&1))"
    "$py" -m venv "$VENV_DIR" || _die "'$py -m venv $VENV_DIR' failed (on Debian/Ubuntu: apt-get install python3.11-venv)"
  fi
  _python_ok "$VENV_PY" || _die "$VENV_DIR holds $("$VENV_PY" --version 2>&1), need >= 3.11; delete it and rerun"

  cd "$REPO_ROOT"
  echo ">> upgrading pip"
  "$VENV_PY" -m pip install --upgrade pip
  # torch first, pinned exactly: this resolves to the CPU wheel here, whereas letting the
  # extras resolve an unpinned torch would pull several GB of CUDA packages.
  echo ">> installing torch==2.13.0"
  "$VENV_PY" -m pip install "torch==2.13.0"
  echo ">> installing star-elastic-jax[$extra] (editable)"
  "$VENV_PY" -m pip install -e ".[$extra]"
}
