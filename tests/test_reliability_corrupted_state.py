"""Reliability drill 4, corrupted state: damaged reference-cache shards, incomplete checkpoints,
a corrupted safetensors model, a garbled valid.parquet read by a later stage. Each is detected and
reported by name; none is silently used."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from data_contracts.config import LossConfig, ModelConfig, TrainConfig, load_config
from data_contracts.errors import DataError
from dpo_engine.models import ModelError, load_model
from dpo_engine.refcache import CacheError, cached_reference_logps, compute_reference_logps, read_cache
from test_trainer import _load, _pairs
from tiny import tiny_model_dir


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny") / "m")


# ------------------------------------------------------------------- reference cache shards

@pytest.mark.parametrize("damage", ["truncate", "garble", "delete"])
def test_damaged_reference_shard_is_named_and_recomputed(tiny_dir, tmp_path, damage):
    pairs = _pairs(n=10)
    model = _load(tiny_dir)
    calls = []

    def compute(part):
        calls.append(len(part))
        return compute_reference_logps(model, part, pad_id=0, batch_size=4)

    good, _ = cached_reference_logps(tmp_path, "k", pairs, {}, compute, shard_size=4, log=lambda m: None)
    shard = tmp_path / "k" / "part-00001.parquet"
    data = shard.read_bytes()
    if damage == "truncate":
        shard.write_bytes(data[: len(data) // 2])
    elif damage == "garble":
        shard.write_bytes(data[:8] + bytes(b ^ 0x5A for b in data[8:-8]) + data[-8:])
    else:
        shard.unlink()
    with pytest.raises(CacheError, match="part-00001"):
        read_cache(tmp_path / "k", expect_ids=pairs["example_id"].tolist(), expect_key="k")

    calls.clear()
    messages = []
    df, stats = cached_reference_logps(tmp_path, "k", pairs, {}, compute, shard_size=4, log=messages.append)
    assert calls == [4] and stats["computed_examples"] == 4  # only the damaged shard
    assert any("part-00001" in m for m in messages)
    assert df["ref_chosen_logps"].tolist() == pytest.approx(good["ref_chosen_logps"].tolist(), abs=1e-5)


# ------------------------------------------------------------------- checkpoints

def _train(tiny_dir, pairs, ref, out, max_steps):
    from dpo_engine.trainer import train

    cfg = TrainConfig(learning_rate=1e-3, max_steps=max_steps, save_steps=1, seed=1,
                      per_device_train_batch_size=4)
    return train(_load(tiny_dir), pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=out)


@pytest.mark.parametrize("missing", [
    "model.safetensors",  # skipped with a message naming it; resumes from step-1
    "trainer.pt",
])
def test_incomplete_checkpoint_is_refused_or_skipped(tiny_dir, tmp_path, missing):
    """A checkpoint folder with state.json but without its weights or trainer.pt is never used: the
    re-run either resumes from the older complete one (and says so) or fails naming the file."""
    pairs = _pairs(n=8)
    ref = compute_reference_logps(_load(tiny_dir), pairs, pad_id=0, batch_size=4)
    out = tmp_path / "run"
    _train(tiny_dir, pairs, ref, out, max_steps=2)  # checkpoints at steps 1 and 2 (the end)
    ckpts = out / "checkpoints"
    assert (ckpts / "step-2" / "state.json").is_file() and (ckpts / "step-1" / "state.json").is_file()
    victim = ckpts / "step-2" / missing
    if missing.endswith(".safetensors"):
        for f in (ckpts / "step-2").glob("*.safetensors"):
            f.unlink()
    else:
        victim.unlink()

    try:
        res = _train(tiny_dir, pairs, ref, out, max_steps=2)
    except Exception as e:  # refused: the message must name the checkpoint and the missing file
        assert "step-2" in str(e) and missing in str(e), str(e)
        assert "\n" not in str(e)
    else:  # skipped in favour of the older complete checkpoint
        assert res.resumed_from == 1


# ------------------------------------------------------------------- model weights

@pytest.mark.parametrize("damage", ["truncate", "zeros"])
def test_corrupted_safetensors_model_is_a_one_line_model_error(tiny_dir, tmp_path, damage):
    d = tmp_path / "model"
    shutil.copytree(tiny_dir, d)
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\0" * 64)
    with pytest.raises(ModelError) as err:
        load_model(ModelConfig(name_or_path=str(d)), str(d))
    msg = str(err.value)
    assert str(f) in msg and "corrupted" in msg and "\n" not in msg, msg


# ------------------------------------------------------------------- valid.parquet

def test_garbled_valid_parquet_read_by_a_later_stage_names_the_file(tiny_dir, tmp_path, dpo_home):
    from dpo_engine.stages import precompute, validate

    rows = [{"prompt": f"q{i} what?", "chosen": f"Answer: {i}", "rejected": f"no {i}"} for i in range(20)]
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(None, {"model.name_or_path": str(tiny_dir), "data.source": str(src),
                             "data.eval_fraction": 0.3, "data.max_length": 64})
    run_dir = dpo_home / "runs" / "garbled"
    validated = validate.run(cfg, run_dir)
    valid = Path(validated["train"]["valid"])
    data = valid.read_bytes()
    valid.write_bytes(data[: len(data) // 3] + b"\xde\xad" * 50)

    with pytest.raises(DataError) as err:
        precompute.run(cfg, run_dir, validated)
    msg = str(err.value)
    assert str(valid) in msg and "\n" not in msg, msg
    assert not (run_dir / "precompute.json").exists()
