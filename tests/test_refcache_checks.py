"""Reference-cache checks: the key follows the autocast the reference computes under, non-finite
log-probs are refused on read (and never written), a killed writer's temporary files are cleaned up,
and token ids outside the model's vocabulary stop the precompute before any forward pass."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from data_contracts.config import load_config
from data_contracts.errors import user_error
from dpo_engine.modeling import ModelError
from dpo_engine.reference.cache import COMPLETE, CacheError, _locked, cached_reference_logps, read_cache, remove_leftovers
from dpo_engine.stages import precompute

VALIDATED = {"model_fingerprint": "m" * 16, "tokenizer_fingerprint": "t" * 16, "model_path": "/nowhere",
             "train": {"fingerprint": "d1"}, "eval": {"fingerprint": "d2"}}


# ------------------------------------------------------------------------------ 1. the key

def test_cache_key_follows_the_resolved_autocast(monkeypatch):
    auto = load_config(overrides={})
    assert auto.train.precision == "auto"
    cpu, gpu = (precompute.cache_key(auto, VALIDATED, "train", device=d) for d in ("cpu", "cuda"))
    assert cpu != gpu  # fp32 on the CPU, bf16 autocast on CUDA: two entries
    assert precompute.compute_dtype(auto, "cpu") == "off" and precompute.compute_dtype(auto, "cuda") == "bfloat16"
    # what counts is the resolved compute: "bf16" on the CPU computes (and keys) as "auto" does there
    bf16 = load_config(overrides={"train.precision": "bf16"})
    assert precompute.cache_key(bf16, VALIDATED, "train", device="cpu") == cpu
    assert precompute.cache_key(bf16, VALIDATED, "train", device="cuda") == gpu
    fp16 = load_config(overrides={"train.precision": "fp16"})
    assert precompute.cache_key(fp16, VALIDATED, "train", device="cuda") not in (cpu, gpu)
    # the weights dtype still counts too
    bf16_weights = load_config(overrides={"model.dtype": "bfloat16"})
    assert precompute.cache_key(bf16_weights, VALIDATED, "train", device="cpu") != cpu
    # without a device: the one the precompute picks (pick_device), so a GPU machine gets the bf16 key
    monkeypatch.setattr(precompute, "pick_device", lambda: torch.device("cuda"))
    assert precompute.cache_key(auto, VALIDATED, "train") == gpu
    assert precompute.compute_dtype(auto) == "bfloat16"
    on_gpu = precompute.key(auto, VALIDATED)
    monkeypatch.setattr(precompute, "pick_device", lambda: torch.device("cpu"))
    assert precompute.cache_key(auto, VALIDATED, "train") == cpu
    assert precompute.key(auto, VALIDATED) != on_gpu  # the stage's reuse fingerprint follows too


# ------------------------------------------------------------------------------ 2. NaN / inf

def _rows(n: int) -> pd.DataFrame:
    return pd.DataFrame({"example_id": [f"ex{i}" for i in range(n)]})


def _compute(calls: list):
    def compute(part: pd.DataFrame) -> pd.DataFrame:
        calls.append(len(part))
        k = np.array([int(e[2:]) for e in part["example_id"]], dtype=np.float64)
        return pd.DataFrame({"example_id": part["example_id"].tolist(), "ref_chosen_logps": -1.0 - k,
                             "ref_rejected_logps": -2.0 - k, "chosen_tokens": np.full(len(part), 3),
                             "rejected_tokens": np.full(len(part), 4)})
    return compute


def _plant(shard, column: str, row: int, value: float) -> None:
    """Overwrite one value of a shard, keeping its schema metadata (key): still valid Parquet."""
    table = pq.read_table(shard)
    df = table.to_pandas()
    df.loc[row, column] = value
    back = pa.Table.from_pandas(df, preserve_index=False).replace_schema_metadata(table.schema.metadata)
    pq.write_table(back, shard)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_shard_is_named_and_rebuilt(tmp_path, value):
    rows, calls = _rows(10), []
    good, _ = cached_reference_logps(tmp_path, "k", rows, {}, _compute(calls), shard_size=4, log=lambda m: None)
    shard = tmp_path / "k" / "part-00001.parquet"
    _plant(shard, "ref_rejected_logps", 2, value)
    assert pq.read_table(shard).num_rows == 4  # readable Parquet: only the value is wrong

    with pytest.raises(CacheError, match=r"part-00001\.parquet.*non-finite.*ref_rejected_logps.*ex6"):
        read_cache(tmp_path / "k", expect_ids=rows["example_id"].tolist(), expect_key="k")
    with pytest.raises(CacheError, match="part-00001"):
        read_cache(shard)

    calls.clear()
    messages = []
    df, stats = cached_reference_logps(tmp_path, "k", rows, {}, _compute(calls), shard_size=4, log=messages.append)
    assert calls == [4] and stats["computed_examples"] == 4  # only that shard
    assert any("part-00001" in m and "non-finite" in m for m in messages), messages
    assert np.isfinite(df["ref_rejected_logps"]).all()
    assert df["ref_rejected_logps"].tolist() == good["ref_rejected_logps"].tolist()
    read_cache(tmp_path / "k", expect_ids=rows["example_id"].tolist(), expect_key="k")  # verified again


def test_non_finite_results_are_never_cached(tmp_path):
    calls = []
    inner = _compute(calls)

    def compute(part):
        df = inner(part)
        if "ex5" in part["example_id"].tolist():
            df.loc[df["example_id"] == "ex5", "ref_chosen_logps"] = float("nan")
        return df

    with pytest.raises(CacheError, match=r"non-finite.*ex5.*not cached"):
        cached_reference_logps(tmp_path, "k", _rows(10), {"dtype": "x"}, compute, shard_size=4, log=lambda m: None)
    assert (tmp_path / "k" / "part-00000.parquet").is_file()
    assert not (tmp_path / "k" / "part-00001.parquet").exists() and not (tmp_path / "k" / COMPLETE).exists()


# ------------------------------------------------------------------------------ 3. leftovers

def _killed_writer(folder, name: str) -> str:
    """A process that starts a temporary file as the cache writes them, then is SIGKILLed."""
    code = ("import os, signal, sys; p = os.path.join(sys.argv[1], '.%s.tmp%d' % (sys.argv[2], os.getpid())); "
            "open(p, 'wb').write(b'PAR1 half'); os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), name])
    assert proc.wait() == -9
    return f".{name}.tmp{proc.pid}"


def test_killed_writers_leftovers_are_removed_but_not_a_live_writers(tmp_path):
    rows, calls = _rows(6), []
    cached_reference_logps(tmp_path, "k", rows, {}, _compute(calls), shard_size=4, log=lambda m: None)
    folder = tmp_path / "k"
    dead = [_killed_writer(folder, "part-00001.parquet"), _killed_writer(folder, COMPLETE)]
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live_tmp = folder / f".part-00000.parquet.tmp{live.pid}"
        live_tmp.write_bytes(b"being written")
        own_tmp = folder / f".part-00002.parquet.tmp{__import__('os').getpid()}"
        own_tmp.write_bytes(b"this process")
        assert all((folder / d).is_file() for d in dead)

        messages = []  # the next write/read through the shared cache
        _, stats = cached_reference_logps(tmp_path, "k", rows, {}, _compute(calls), shard_size=4,
                                          log=messages.append)
        assert stats["computed_examples"] == 0
        assert not any((folder / d).exists() for d in dead)
        assert live_tmp.is_file() and own_tmp.is_file()  # a live process's file is never touched
        assert any("killed writer" in m and dead[0] in m for m in messages), messages

        again = _killed_writer(folder, "part-00000.parquet")  # a plain read of the folder cleans up too,
        with _locked(folder):  # but not while a writer holds the folder's lock (it cleans up itself)
            read_cache(folder, expect_ids=rows["example_id"].tolist(), expect_key="k")
            assert (folder / again).is_file()
        read_cache(folder, expect_ids=rows["example_id"].tolist(), expect_key="k")
        assert not (folder / again).exists() and live_tmp.is_file()
    finally:
        live.kill()
        live.wait()
    assert remove_leftovers(folder) == [live_tmp.name]  # its writer is gone now
    own_tmp.unlink()


# ------------------------------------------------------------------------------ 4. token ids

def _pairs(ids: dict) -> pd.DataFrame:
    base = {"prompt_input_ids": [[1, 2], [3]], "chosen_input_ids": [[4, 5], [6, 7]],
            "rejected_input_ids": [[8], [9, 2]]}
    return pd.DataFrame({"example_id": ["a1", "b2"], **{**base, **ids}})


def test_check_token_ids():
    precompute.check_token_ids(_pairs({}), 10, "train split")  # all below 10: fine
    precompute.check_token_ids(_pairs({}).iloc[:0], 10, "train split")  # no rows
    with pytest.raises(ModelError) as e:
        precompute.check_token_ids(_pairs({"chosen_input_ids": [[4, 5], [6, 10]]}), 10, "train split x")
    msg = str(e.value)
    for part in ("train split x", "example_id b2", "chosen_input_ids", "token id 10", "vocabulary of 10",
                 "tokenizer and the model do not match"):
        assert part in msg, msg
    assert "\n" not in msg and user_error(e.value) is e.value  # the CLI prints it as one line
    with pytest.raises(ModelError, match=r"example_id a1: rejected_input_ids holds token id -1,.*2 out-of-range id"):
        precompute.check_token_ids(_pairs({"rejected_input_ids": [[-1], [9, 99]]}), 10, "eval split")
    # valid.parquet's own column types (int32 lists read back as numpy arrays)
    back = pd.read_parquet(_roundtrip(_pairs({"prompt_input_ids": [[1, 2], [3, 12]]})))
    with pytest.raises(ModelError, match="example_id b2: prompt_input_ids holds token id 12"):
        precompute.check_token_ids(back, 10, "eval split")


def _roundtrip(df: pd.DataFrame):
    sink = pa.BufferOutputStream()
    pq.write_table(pa.Table.from_pandas(df, preserve_index=False), sink)
    return pa.BufferReader(sink.getvalue())


def test_precompute_stage_refuses_ids_outside_the_vocabulary_before_any_forward(dpo_home, tmp_path,
                                                                                monkeypatch, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from flows.cli import default_config_path, main
    from dpo_engine.stages import validate
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()  # ~100 tokens; the model below knows only the first 40
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                         bos_token_id=None))
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    tok.save_pretrained(tmp_path / "m")
    for split, n in (("train", 6), ("eval", 3)):  # lower-case letters: ids the model does not have
        (tmp_path / f"{split}.jsonl").write_text("".join(
            json.dumps({"prompt": f"Q{split}{i}?", "chosen": f"yes {i}", "rejected": f"no {i}"}) + "\n"
            for i in range(n)))
    sets = [f"model.name_or_path={tmp_path / 'm'}", f"data.source={tmp_path / 'train.jsonl'}",
            f"data.eval_source={tmp_path / 'eval.jsonl'}", "data.max_length=128", "reference.batch_size=8"]
    run_dir = dpo_home / "runs" / "ids"
    run_dir.mkdir(parents=True)
    validate.run(load_config(default_config_path(), sets), run_dir)
    forwards = []
    monkeypatch.setattr(precompute, "compute_reference_logps", lambda *a, **k: forwards.append(1))

    capsys.readouterr()
    rc = main(["precompute", "--run-dir", str(run_dir), *[x for s in sets for x in ("--set", s)]])
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and "it/s]" not in line]  # progress bars aside
    assert rc == 1 and forwards == []
    assert len(err) == 1 and err[0].startswith("error: train split"), err
    assert "example_id" in err[0] and "vocabulary of 40 tokens" in err[0] and "do not match" in err[0]


# ------------------------------------------------------------------------------ content hashes

def _logps(rows: pd.DataFrame) -> pd.DataFrame:
    i = rows["example_id"].str[1:].astype(int).to_numpy()
    return pd.DataFrame({"example_id": rows["example_id"], "ref_chosen_logps": -1.5 - i * 0.25,
                         "ref_rejected_logps": -3.0 - i * 0.5})


def _flip_quietly(path, truth: pd.DataFrame) -> None:
    """Change one byte of a Parquet file such that it still reads, with finite but different values
    (the damage only a content hash can see): the first such byte."""
    raw = path.read_bytes()
    for at in range(4, len(raw) - 8):  # between the magic numbers
        flipped = raw[:at] + bytes([raw[at] ^ 0x04]) + raw[at + 1:]
        path.write_bytes(flipped)
        try:
            df = pq.read_table(path).to_pandas()
        except Exception:  # noqa: BLE001 - unreadable: not the quiet kind
            continue
        if list(df.columns) != list(truth.columns) or len(df) != len(truth):
            continue
        values = df[["ref_chosen_logps", "ref_rejected_logps"]].to_numpy(dtype=float)
        if np.isfinite(values).all() and df["example_id"].tolist() == truth["example_id"].tolist() \
                and not np.array_equal(values, truth[["ref_chosen_logps", "ref_rejected_logps"]].to_numpy()):
            return
    raise AssertionError("no quiet byte flip found")


def test_a_flipped_byte_in_a_shard_is_found_and_the_next_run_heals_it(tmp_path):
    """A byte changed inside a shard's data page (still a valid Parquet file, still finite values) is
    caught by the recorded sha256 on any read; the shard and _COMPLETE.json are removed, so the next
    precompute recomputes just that shard and reads back the true values."""
    rows = pd.DataFrame({"example_id": [f"e{i}" for i in range(10)]})
    calls = []

    def compute(part):
        calls.append(len(part))
        return _logps(part)

    df, stats = cached_reference_logps(tmp_path, "k", rows, {"split": "train"}, compute, shard_size=4)
    folder = tmp_path / "k"
    assert stats["computed_examples"] == 10 and set(json.loads((folder / COMPLETE).read_text())["sha256"]) == {
        "part-00000.parquet", "part-00001.parquet", "part-00002.parquet"}
    shard = folder / "part-00001.parquet"
    truth = pq.read_table(shard).to_pandas()
    _flip_quietly(shard, truth)
    with pytest.raises(CacheError, match="part-00001.parquet does not match the sha256"):
        read_cache(folder, expect_ids=rows["example_id"].tolist(), expect_key="k")  # e.g. training
    assert not (folder / COMPLETE).exists() and not shard.exists()  # not trusted by any stage now

    calls.clear()
    healed, stats = cached_reference_logps(tmp_path, "k", rows, {"split": "train"}, compute, shard_size=4)
    assert calls == [4] and stats["computed_examples"] == 4
    assert healed["ref_chosen_logps"].tolist() == _logps(rows)["ref_chosen_logps"].tolist()

    # found by the precompute itself (holding the folder's lock): healed in the same call
    _flip_quietly(shard, truth)
    calls.clear()
    again, stats = cached_reference_logps(tmp_path, "k", rows, {"split": "train"}, compute, shard_size=4)
    assert calls == [4] and again["ref_chosen_logps"].tolist() == _logps(rows)["ref_chosen_logps"].tolist()
