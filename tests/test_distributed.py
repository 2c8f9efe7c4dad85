"""Data parallel exactness: 2 processes x batch 4 (gloo, CPU) == 1 process x batch 8."""

import os
import time

import pandas as pd
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from data_contracts.config import LossConfig, TrainConfig

STEPS = 5


def _cfg(bs):
    return TrainConfig(learning_rate=1e-3, max_steps=STEPS, seed=1, per_device_train_batch_size=bs,
                       padding_free=True)


def _worker(rank, world, model_dir, pairs_file, ref_file, out_dir):
    from transformers import AutoModelForCausalLM

    from dpo_engine.trainer import train

    torch.set_num_threads(1)  # no OpenMP pool in a forked child
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/pg", rank=rank, world_size=world)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        res = train(model, pd.read_parquet(pairs_file), pd.read_parquet(ref_file), loss_cfg=LossConfig(),
                    cfg=_cfg(4), pad_id=0, out_dir=__import__("pathlib").Path(out_dir) / f"r{rank}")
        assert res.steps == STEPS
        torch.save([p.detach() for p in model.parameters()], os.path.join(out_dir, f"w{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_processes_match_one_process_with_the_global_batch(tmp_path):
    from transformers import AutoModelForCausalLM

    from dpo_engine.refcache import compute_reference_logps
    from dpo_engine.trainer import train
    from test_trainer import _pairs
    from tiny import tiny_model_dir

    model_dir = tiny_model_dir(tmp_path / "m")
    pairs = _pairs(n=12)
    ref = compute_reference_logps(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32),
                                  pairs, pad_id=0, batch_size=8)
    pairs.to_parquet(tmp_path / "pairs.parquet")
    ref.to_parquet(tmp_path / "ref.parquet")
    # fork: the children inherit the imported modules (a spawned child spends ~10 s importing)
    ctx = mp.start_processes(_worker, args=(2, str(model_dir), str(tmp_path / "pairs.parquet"),
                                            str(tmp_path / "ref.parquet"), str(tmp_path)),
                             nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            raise TimeoutError("distributed workers did not finish")

    single = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    train(single, pairs, ref, loss_cfg=LossConfig(), cfg=_cfg(8), pad_id=0, out_dir=tmp_path / "single")
    want = torch.cat([p.detach().flatten() for p in single.parameters()])
    for rank in (0, 1):
        got = torch.cat([p.flatten() for p in torch.load(tmp_path / f"w{rank}.pt", weights_only=True)])
        assert torch.allclose(got, want, atol=1e-5)
    assert not torch.allclose(want, torch.cat([p.detach().flatten() for p in AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32).parameters()]), atol=1e-4)  # training moved the weights
