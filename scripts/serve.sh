#!/usr/bin/env bash
# Install (once), start a local Prefect server on 127.0.0.1:4200 and serve the deployment dpo/full
# (nightly 02:00 UTC). Then, in another shell: PREFECT_API_URL=http://127.0.0.1:4200/api
# .venv/bin/prefect deployment run dpo/full --watch
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$root/scripts/bootstrap.sh"
exec "$root/.venv/bin/dpo" serve "$@"
