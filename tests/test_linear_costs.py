"""Costs that must stay constant per item however many items came before (issue 16, "linear at
scale"): measured as bytes written or entries scanned on a small scale, never as time."""

from __future__ import annotations

import data_contracts.helpers as helpers


def test_file_hash_memo_writes_a_constant_amount_per_file_and_keeps_concurrent_entries(dpo_home, tmp_path,
                                                                                       monkeypatch):
    files = []
    for i in range(60):
        f = tmp_path / f"w{i}.bin"
        f.write_bytes(bytes([i]) * 100)
        files.append(f)
    written = []
    real_write = helpers.write_text
    monkeypatch.setattr(helpers, "write_text", lambda p, text: written.append(len(text)) or real_write(p, text))
    digests = [helpers.file_sha256(f) for f in files]
    assert digests == [helpers.sha256_file(f) for f in files]
    assert len(written) == 60 and max(written) - min(written) <= 2  # one entry each, not a growing file
    assert [helpers.file_sha256(f) for f in files] == digests and len(written) == 60  # memo hits

    # a second writer memoising another file in the middle of this one's keeps both entries
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"a")
    b.write_bytes(b"b")
    real_hash = helpers.sha256_file

    def nested(path):
        if path == a:
            helpers.file_sha256(b)
        return real_hash(path)

    monkeypatch.setattr(helpers, "sha256_file", nested)
    helpers.file_sha256(a)
    monkeypatch.setattr(helpers, "sha256_file", lambda p: (_ for _ in ()).throw(AssertionError(f"rehashed {p}")))
    assert helpers.file_sha256(a) == real_hash(a) and helpers.file_sha256(b) == real_hash(b)


class _Counting(list):
    """A history that counts how many of its entries are read."""

    reads = 0

    def __iter__(self):
        for x in super().__iter__():
            _Counting.reads += 1
            yield x

    def __reversed__(self):
        for x in super().__reversed__():
            _Counting.reads += 1
            yield x


def test_logged_metrics_reads_only_the_window(monkeypatch):
    from dpo_engine.training.observability import logged_metrics

    every, reads = 10, []
    history = _Counting()
    for step in range(1, 2001):
        history.append({"step": step, "loss": 1.0 / step, "num_tokens": step * 100})
        if step % every == 0:
            _Counting.reads = 0
            out = logged_metrics(history, every)
            reads.append(_Counting.reads)
            assert out["num_tokens"] == step * 100
            assert abs(out["loss"] - sum(1.0 / s for s in range(step - every + 1, step + 1)) / every) < 1e-12
    assert max(reads) <= every + 1  # not the whole history: the same at step 2,000 as at step 10


def test_checkpoint_state_stays_the_same_size_and_the_history_is_appended_once(tmp_path):
    """20 checkpoints of a growing history: each state.json is the same size (the history is not
    inside it), history.jsonl grows by the new steps only, and every checkpoint reads its own
    history back; a tail left by a killed run is cut before the next append."""
    import json

    from dpo_engine.training.history_log import HISTORY, read_history, sync_history

    ckpt = tmp_path / "checkpoints"
    ckpt.mkdir()
    history, records, sizes = [], [], []
    for step in range(1, 201):
        history.append({"step": step, "loss": 1.0 / step, "num_tokens": 100 * step})
        if step % 10 == 0:
            rec = sync_history(ckpt, history)
            records.append(rec)
            sizes.append(len(json.dumps(rec)))
    growth = [b["history_bytes"] - a["history_bytes"] for a, b in zip(records, records[1:])]
    assert max(sizes) - min(sizes) <= 8 and max(growth) < 1.2 * min(growth)  # per checkpoint: flat
    for rec in (records[0], records[9], records[-1]):
        got = read_history(ckpt, rec["history_len"], rec["history_bytes"], rec["history_sha256"])
        assert got == history[:rec["history_len"]]
    with open(ckpt / HISTORY, "ab") as fh:
        fh.write(b'{"step": 201, "lo')  # a killed run's cut line
    history.append({"step": 201, "loss": 0.5, "num_tokens": 20100})
    rec = sync_history(ckpt, history)
    assert read_history(ckpt, rec["history_len"], rec["history_bytes"], rec["history_sha256"]) == history
    assert (ckpt / HISTORY).stat().st_size == rec["history_bytes"]


def test_should_stop_reads_the_history_only_at_evaluations():
    from data_contracts.config import TrainConfig
    from dpo_engine.training.stopping import should_stop

    cfg = TrainConfig(eval_steps=50, early_stopping_metric="eval/loss", early_stopping_mode="min",
                      early_stopping_patience=2)
    history, reads = _Counting(), []
    for step in range(1, 1001):
        entry = {"step": step, "loss": 0.5}
        if step % 50 == 0:
            entry["eval/loss"] = 1.0 - step / 1000 if step <= 500 else 0.6  # no better after step 500
        history.append(entry)
        _Counting.reads = 0
        stop = should_stop(history, cfg)
        reads.append((step, _Counting.reads))
        if stop:
            break
    assert step == 600  # 2 evaluations without improvement (550, 600)
    assert max(r for s, r in reads if s % 50) == 0  # between evaluations nothing is read


def test_precompute_holds_token_ids_only_and_shards_grow_with_the_split(tmp_path):
    from data_contracts.config import DataConfig
    from data_contracts.validation import read_valid, validate_split
    from dpo_engine.stages.precompute import REFERENCE_COLUMNS, shard_rows
    from tiny import tiny_tokenizer

    assert (shard_rows(10), shard_rows(204_800), shard_rows(1_000_000), shard_rows(10**9)) == (1024, 1024, 5000, 65536)
    rows = [{"prompt": "tell me " * 50 + str(i), "chosen": f" {i}", "rejected": f" no {i}"} for i in range(30)]
    validate_split(rows, tmp_path / "v", tiny_tokenizer(), DataConfig(max_length=1024))
    df = read_valid(tmp_path / "v" / "valid.parquet", REFERENCE_COLUMNS)
    assert set(df.columns) <= set(REFERENCE_COLUMNS) and "prompt" not in df.columns  # no texts, no meta
    assert len(df) == 30
