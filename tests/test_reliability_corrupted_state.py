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
from dpo_engine.modeling import ModelError, load_model
from dpo_engine.reference import CacheError, cached_reference_logps, compute_reference_logps, read_cache
from dpo_engine.training.history_log import read_history
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

def _run(tiny_dir, pairs, ref, out, max_steps):
    """(model, result) of a run with a checkpoint after every step (the newest 2 kept)."""
    from dpo_engine.training import train

    cfg = TrainConfig(learning_rate=1e-3, max_steps=max_steps, save_steps=1, seed=1,
                      per_device_train_batch_size=4)
    model = _load(tiny_dir)
    return model, train(model, pairs, ref, loss_cfg=LossConfig(), cfg=cfg, pad_id=0, out_dir=out)


def _train(tiny_dir, pairs, ref, out, max_steps):
    return _run(tiny_dir, pairs, ref, out, max_steps)[1]


def _weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _damage(f: Path, how: str) -> None:
    data = f.read_bytes()
    if how == "truncate":
        f.write_bytes(data[: len(data) // 2])
    elif how == "flip":  # bytes in the middle of the tensor data: the header still parses
        start = 8 + int.from_bytes(data[:8], "little") if f.suffix == ".safetensors" else 0
        mid = (start + len(data)) // 2
        f.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid:mid + 16]) + data[mid + 16:])
    else:  # garble: not JSON any more
        f.write_bytes(b"{\"step\": 3, \"hist" + bytes(b ^ 0x5A for b in data[20:]))


@pytest.fixture(scope="module")
def three_steps(tiny_dir, tmp_path_factory):
    """An uninterrupted 3-step run (checkpoints step-2 and step-3 kept) and its final weights."""
    pairs = _pairs(n=8)
    ref = compute_reference_logps(_load(tiny_dir), pairs, pad_id=0, batch_size=4)
    out = tmp_path_factory.mktemp("three") / "run"
    model, _ = _run(tiny_dir, pairs, ref, out, max_steps=3)
    return pairs, ref, out, _weights(model)


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


@pytest.mark.parametrize("victim,how", [
    ("model.safetensors", "truncate"),  # SafetensorError at load; its size differs from the manifest
    ("trainer.pt", "truncate"),  # the zip reader's error at load
    ("model.safetensors", "flip"),  # loads without error: only the manifest's sha256 sees it
    ("state.json", "garble"),  # invalid JSON
])
def test_damaged_checkpoint_is_named_and_the_previous_one_resumed(tiny_dir, three_steps, tmp_path, capsys,
                                                                  victim, how):
    """A checkpoint file that exists but is damaged is reported by name and the previous checkpoint
    is resumed instead; the resumed run ends with the uninterrupted run's weights."""
    pairs, ref, done, final = three_steps
    out = tmp_path / "run"
    shutil.copytree(done, out)
    _damage(out / "checkpoints" / "step-3" / victim, how)
    capsys.readouterr()
    model, res = _run(tiny_dir, pairs, ref, out, max_steps=3)
    said = capsys.readouterr().out
    assert res.resumed_from == 2, said
    assert f"checkpoint skipped: step-3/{victim} is damaged (" in said, said
    assert torch.equal(_weights(model), final)


def test_checkpoints_without_a_manifest_get_structural_checks(tiny_dir, three_steps, tmp_path, capsys):
    """Checkpoints written before state.json listed the files' hashes (and held the history itself)
    still resume; a truncated
    trainer.pt in one of them is told from its zip directory."""
    pairs, ref, done, final = three_steps
    out = tmp_path / "run"
    shutil.copytree(done, out)
    for step in (2, 3):
        f = out / "checkpoints" / f"step-{step}" / "state.json"
        state = json.loads(f.read_text())
        history = read_history(f.parent.parent, state["history_len"], state["history_bytes"], state["history_sha256"])
        f.write_text(json.dumps({"step": state["step"], "history": history}))  # the history inside, no files
    _damage(out / "checkpoints" / "step-3" / "trainer.pt", "truncate")
    capsys.readouterr()
    model, res = _run(tiny_dir, pairs, ref, out, max_steps=3)
    said = capsys.readouterr().out
    assert res.resumed_from == 2 and "checkpoint skipped: step-3/trainer.pt is damaged (" in said, said
    assert torch.equal(_weights(model), final)


def test_no_intact_checkpoint_left_starts_from_step_0(tiny_dir, three_steps, tmp_path, capsys):
    pairs, ref, done, final = three_steps
    out = tmp_path / "run"
    shutil.copytree(done, out)
    _damage(out / "checkpoints" / "step-3" / "state.json", "garble")
    _damage(out / "checkpoints" / "step-2" / "model.safetensors", "flip")
    capsys.readouterr()
    model, res = _run(tiny_dir, pairs, ref, out, max_steps=3)
    said = capsys.readouterr().out
    assert res.resumed_from == 0, said
    assert "step-3/state.json is damaged" in said and "step-2/model.safetensors is damaged" in said, said
    assert "no intact checkpoint left" in said and "starts from step 0" in said, said
    assert torch.equal(_weights(model), final)  # the same run again from the start


def test_damage_found_only_while_loading_falls_back_and_overwrites_the_partial_load(
        tiny_dir, three_steps, tmp_path, monkeypatch, capsys):
    """A file damaged after the checks (or that the checks cannot see): the load names it and falls
    back to the older checkpoint, whose load overwrites the weights the damaged one had already set
    (and nothing else was set from it). With no older checkpoint left the run stops, naming the file."""
    from dpo_engine.training import checkpoints
    from dpo_engine.training import TrainingError

    pairs, ref, done, final = three_steps
    monkeypatch.setattr(checkpoints, "_checkpoint_problem", lambda *a, **k: None)  # the checks see nothing
    out = tmp_path / "run"
    shutil.copytree(done, out)
    _damage(out / "checkpoints" / "step-3" / "trainer.pt", "truncate")  # read after step-3's weights
    capsys.readouterr()
    model, res = _run(tiny_dir, pairs, ref, out, max_steps=3)
    said = capsys.readouterr().out
    assert res.resumed_from == 2 and "checkpoint skipped: step-3/trainer.pt is damaged (" in said, said
    assert torch.equal(_weights(model), final)

    shutil.rmtree(out / "checkpoints" / "step-2")
    _damage(out / "checkpoints" / "step-3" / "trainer.pt", "truncate")
    with pytest.raises(TrainingError) as err:
        _run(tiny_dir, pairs, ref, out, max_steps=3)
    msg = str(err.value)
    assert "step-3/trainer.pt is damaged" in msg and "no older intact checkpoint" in msg and "\n" not in msg, msg


def test_fsdp_resume_falls_back_past_a_damaged_checkpoint(tiny_dir, three_steps, tmp_path, monkeypatch, capsys):
    """The FSDP path (a 1-rank gloo group in this process) reads the checkpoint before sharding: a
    trainer.pt found damaged after the weights were loaded falls back to step-2, like the plain path."""
    import torch.distributed as dist

    from dpo_engine.training import checkpoints

    pairs, ref, _, final = three_steps
    out = tmp_path / "run"
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        for k, v in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2",
                     "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer"}.items():
            monkeypatch.setenv(k, v)
        whole, _ = _run(tiny_dir, pairs, ref, out, max_steps=3)
        assert torch.allclose(_weights(whole), final, atol=1e-6)  # FSDP trains like the plain loop
        monkeypatch.setattr(checkpoints, "_checkpoint_problem", lambda *a, **k: None)  # found while loading
        _damage(out / "checkpoints" / "step-3" / "trainer.pt", "truncate")
        capsys.readouterr()
        model, res = _run(tiny_dir, pairs, ref, out, max_steps=3)
        said = capsys.readouterr().out
        assert res.resumed_from == 2 and "checkpoint skipped: step-3/trainer.pt is damaged (" in said, said
        assert torch.equal(_weights(model), _weights(whole))
    finally:
        dist.destroy_process_group()


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


@pytest.mark.parametrize("split", ["train", "eval"])
def test_garbled_valid_parquet_read_by_the_train_stage_names_the_file(tmp_path, dpo_home, split):
    """The train stage reads valid.parquet (the train split in ``run``, the eval split for periodic
    evaluation) through the reader that names a damaged file in one line."""
    import pandas as pd

    from dpo_engine.stages import train as train_stage

    valid = tmp_path / split / "valid.parquet"
    valid.parent.mkdir()
    pd.DataFrame({"example_id": ["a", "b"], "prompt_input_ids": [[5, 6], [7]]}).to_parquet(valid)
    data = valid.read_bytes()
    valid.write_bytes(data[: len(data) // 3] + b"\xde\xad" * 50)
    cfg = load_config(None, {"train.eval_steps": 1})
    with pytest.raises(DataError) as err:
        if split == "train":
            train_stage.run(cfg, dpo_home / "runs" / "garbled", {"train": {"valid": str(valid)}},
                            {"fingerprint": "f"})
        else:
            train_stage.eval_callback(cfg, {"eval": {"valid": str(valid)}}, {"eval_ref": "r", "eval_ref_key": "k"},
                                      None, 0, "cpu")
    msg = str(err.value)
    assert str(valid) in msg and "\n" not in msg, msg
