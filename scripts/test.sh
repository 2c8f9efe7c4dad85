#!/usr/bin/env bash
# README command 2: install (once) and run the test suite.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec env HF_HUB_OFFLINE=1 "$root/.venv/bin/python" -m pytest -q "$@"
