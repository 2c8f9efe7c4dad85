"""The stage index trusts a recorded output only while its content is what was recorded (issue 16):
a byte changed since (size and mtime kept) or a record without hashes makes the stage run again."""

from __future__ import annotations

import json
import os

from dpo_engine.stages import index


def _record(tmp_path, name="out.bin", data=b"weights" * 100):
    run = tmp_path / "run"
    run.mkdir(exist_ok=True)
    out = tmp_path / name
    if name.endswith("/"):
        out.mkdir()
        (out / "model.safetensors").write_bytes(data)
    else:
        out.write_bytes(data)
    index.record("train", "fp1", {"stage": "train", "run_dir": str(run), "summary": "train: done",
                                  "outputs": [str(out)]})
    return out


def test_a_changed_output_is_not_trusted(dpo_home, tmp_path):
    out = _record(tmp_path)
    assert index.lookup("train", "fp1") is not None and index.outputs_token("train", "fp1")
    st = out.stat()
    raw = bytearray(out.read_bytes())
    raw[10] ^= 0xFF
    out.write_bytes(bytes(raw))
    os.utime(out, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: only the content differs
    assert index.lookup("train", "fp1") is None and index.outputs_token("train", "fp1") is None
    assert index.reused("train", "fp1", tmp_path / "run") is None


def test_a_changed_file_inside_a_folder_output_and_an_unhashed_record_are_not_trusted(dpo_home, tmp_path):
    folder = _record(tmp_path, "model/")
    assert index.lookup("train", "fp1") is not None
    (folder / "model.safetensors").write_bytes(b"other" * 140)
    assert index.lookup("train", "fp1") is None
    _record(tmp_path, "again.bin")
    p = index._index_path("train", "fp1")
    rec = json.loads(p.read_text())
    rec.pop("output_sha256")
    p.write_text(json.dumps(rec))  # as an older version recorded it
    assert index.lookup("train", "fp1") is None
