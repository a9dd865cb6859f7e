#!/usr/bin/env bash
# Install star-elastic-jax with its test extra into .venv and run the test suite on CPU.
# This is the README's test quickstart and exactly what CI (.ci/run) runs.
# Extra arguments are passed to pytest, e.g.  bash scripts/test.sh -k hf -x
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/_venv.sh
source scripts/_venv.sh
ensure_venv test

export JAX_PLATFORMS=cpu

echo ">> running tests"
set +e
"$VENV_PY" -m pytest -q -n 2 tests "$@"
rc=$?
set -e

if [[ $rc -eq 5 ]]; then
  echo "ERROR: pytest collected no tests (exit code 5); the test suite under tests/ is missing or every test was deselected." >&2
  exit 1
fi
exit "$rc"
