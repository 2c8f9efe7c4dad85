#!/usr/bin/env bash
# README command 1: install (once) and run the whole dpo flow on the embedded default.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
exec "$root/.venv/bin/dpo" run "$@"
