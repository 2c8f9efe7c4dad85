"""The precompute stage under `accelerate launch`: the 2 ranks each compute their share of every cache
shard, rank 0 writes the cache, which equals what one process computes (same format, same values)."""

from pathlib import Path

import torch

from data_contracts.config import load_config
from test_distributed import _overrides
from tiny import tiny_model_dir


def test_launched_precompute_shards_over_the_processes(dpo_home, tmp_path):
    from data_contracts.config import ModelConfig
    from dpo_engine.modeling import load_model
    from dpo_engine.reference import compute_reference_logps, read_cache
    from dpo_engine.stages import precompute, validate
    from data_contracts.validation import read_valid

    model_dir = tiny_model_dir(tmp_path / "m")
    cfg = load_config(overrides=_overrides(model_dir))
    run_dir = dpo_home / "runs" / "pre"
    run_dir.mkdir(parents=True)
    v = validate.run(cfg, run_dir)
    pre = precompute.run(cfg, run_dir, v)
    assert pre["processes"] == 2 and pre["computed_examples"] == 16
    assert (run_dir / "precompute" / "launch" / "result.json").is_file()
    base = load_model(ModelConfig(), str(model_dir))
    for split in ("train", "eval"):
        rows = read_valid(v[split]["valid"])
        cached = read_cache(Path(pre[f"{split}_ref"]), expect_ids=rows["example_id"].tolist(),
                            expect_key=pre[f"{split}_ref_key"]).set_index("example_id").loc[rows["example_id"]]
        want = compute_reference_logps(base, rows, pad_id=0, batch_size=8)
        for col in ("ref_chosen_logps", "ref_rejected_logps"):
            assert torch.allclose(torch.tensor(cached[col].to_numpy()), torch.tensor(want[col].to_numpy()),
                                  atol=1e-6)
        assert (cached["chosen_tokens"].to_numpy() == want["chosen_tokens"].to_numpy()).all()

    # a run whose caches are all complete already (here: the eval split only, for an online reference)
    # is read in this process: nothing launched, zero forward passes
    online = load_config(overrides=_overrides(model_dir, **{"reference.source": "model"}))
    again = precompute.run(online, dpo_home / "runs" / "again", v)
    assert again["reused"] is False and again["computed_examples"] == 0 and again["eval_ref"] == pre["eval_ref"]
    assert not (dpo_home / "runs" / "again" / "precompute" / "launch").exists()
