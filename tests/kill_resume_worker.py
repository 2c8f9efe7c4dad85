"""Subprocess body for tests/test_kill_resume.py: train a tiny model with checkpoints every step."""

import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from data_contracts.config import LossConfig, TrainConfig  # noqa: E402
from dpo_engine.reference import compute_reference_logps  # noqa: E402
from dpo_engine.training import train  # noqa: E402
from test_trainer import _pairs  # noqa: E402

model_dir, out_dir, pause = sys.argv[1], Path(sys.argv[2]), float(sys.argv[3])
pairs = _pairs(n=8)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
ref = compute_reference_logps(model, pairs, pad_id=0, batch_size=5)
model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
cfg = TrainConfig(learning_rate=1e-3, max_steps=8, seed=3, save_steps=1, per_device_train_batch_size=2)
res = train(model, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=out_dir,
      progress=lambda s, m: time.sleep(pause))
(out_dir / "resumed_from.txt").write_text(str(res.resumed_from))
save_file({k: v.contiguous() for k, v in model.state_dict().items() if "lm_head" not in k},
          str(out_dir / "final.safetensors"))
