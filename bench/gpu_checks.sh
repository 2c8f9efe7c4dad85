#!/usr/bin/env bash
# Everything a lent GPU should measure, in priority order, each step under its own time limit
# (a session gets about 30 minutes of device time, 10 per command): run it as
#   bash bench/gpu_checks.sh [STEP ...]        # steps: tests head mfu trainer profile (default: all)
# on the device, with the project's venv (or any Python with torch+CUDA and the bench extra) as
# $PY. Each step prints its figures; copy them into BENCHMARKS.md with the device and versions.
#   tests:   the CUDA tests (Triton head vs the torch path, bf16 autocast, padded and packed)
#   head:    issue 4's head bench at the Qwen3-0.6B shape (ours vs naive, TRL, Liger)
#   mfu:     issue 5's MFU target shape (8 pairs x 1,024 tokens): fp32 weights vs bf16 weights with
#            fp32 master copies, each eager and compiled with lengths padded to multiples of 64
#   trainer: issue 5's comparison with TRL on the UltraFeedback lengths
#   profile: where a step's GPU time goes (bf16 weights)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY="${PY:-.venv/bin/python}"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(tests head mfu trainer profile)
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(), 'torch', torch.__version__)" || exit 1
for step in "${steps[@]}"; do
  echo "=== $step ($(date -u +%H:%M:%S) UTC)"
  case "$step" in
    tests)   timeout 300 "$PY" -m pytest -q -p no:cacheprovider tests/test_triton_head.py tests/test_master_weights.py -k "cuda or master" ;;
    head)    timeout 300 "$PY" bench/bench_head.py --qwen3 ;;
    mfu)     timeout 540 "$PY" bench/bench_trainer.py --gpu --fixed-length 1024 \
               --workers ours,ours+bf16,ours+compile+pad64,ours+bf16+compile+pad64 ;;
    trainer) timeout 540 "$PY" bench/bench_trainer.py --gpu --workers ours,ours+bf16,ours+bf16+compile+pad64,trl ;;
    profile) timeout 300 "$PY" bench/profile_train_step.py --steps 3 --bf16-weights ;;
    *) echo "unknown step $step (tests head mfu trainer profile)"; exit 2 ;;
  esac
  echo "=== $step: exit $?"
done
