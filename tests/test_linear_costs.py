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
