#!/usr/bin/env bash
# README command 2: install (once) and run the test suite. Test files are spread over
# DPO_TEST_WORKERS processes (default 2; each file's tests stay in one process, so a module's
# servers and fixtures start once).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
cd "$root"
exec env HF_HUB_OFFLINE=1 "$root/.venv/bin/python" -m pytest -q -n "${DPO_TEST_WORKERS:-2}" --dist loadfile "$@"
