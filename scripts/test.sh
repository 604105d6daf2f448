#!/usr/bin/env bash
# The test suite: sets up a fresh machine if needed (scripts/setup.sh), then runs pytest.
# pytest's exit code 5 (no tests collected) is a failure here.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
bash scripts/setup.sh || exit 1
venv="${SVDQ_VENV:-$root/.venv}"
"$venv/bin/python" -m pytest -q -ra "$@"
rc=$?
if [ "$rc" -eq 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
