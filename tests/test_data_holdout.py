"""Train and eval streamed from one source by a seeded hash split: disjoint, complete, true indices."""

import json

import pandas as pd

from data_contracts.config import DataConfig
from data_contracts.validation import split_rows, validate_split
from tiny import tiny_tokenizer


def test_holdout_streams_both_sides_with_source_indices(tmp_path):
    rows = [{"prompt": f"Question {i}?", "chosen": f" Yes {i}.", "rejected": f" No {i}."} for i in range(300)]
    src = tmp_path / "d.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = DataConfig(source=str(src), eval_fraction=0.2)
    tok = tiny_tokenizer()
    reps = {side: validate_split(str(src), tmp_path / side, tok, cfg, split=side, batch_rows=64,
                                 holdout=(0.2, 0, side)) for side in ("train", "eval")}
    assert reps["train"]["rows_in"] + reps["eval"]["rows_in"] == 300
    tr = pd.read_parquet(tmp_path / "train" / "valid.parquet")
    ev = pd.read_parquet(tmp_path / "eval" / "valid.parquet")
    assert not set(tr["example_id"]) & set(ev["example_id"])
    assert sorted(tr["source_index"].tolist() + ev["source_index"].tolist()) == list(range(300))
    for df in (tr, ev):  # each source index points at its own source row
        for i, p in zip(df["source_index"], df["prompt"]):
            assert json.loads(p) == rows[i]["prompt"]
    want_train, want_eval = split_rows(rows, 0.2, 0)
    assert len(ev) == len(want_eval) and len(tr) == len(want_train)
    assert 30 < len(ev) < 90


def test_validate_stage_splits_a_local_file(dpo_home, tmp_path):
    from data_contracts.config import load_config
    from dpo_engine.stages import validate
    from tiny import tiny_model_dir

    rows = [{"prompt": f"Q{i}?", "chosen": f" A{i}.", "rejected": f" B{i}!"} for i in range(100)]
    src = tmp_path / "prefs.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = load_config(None, {"data.source": str(src), "data.eval_fraction": 0.25,
                             "model.name_or_path": str(tiny_model_dir(tmp_path / "m"))})
    res = validate.run(cfg, tmp_path / "run")
    assert res["train"]["rows"] + res["eval"]["rows"] == 100
    assert res["eval"]["rows"] > 0 and res["train"]["rows"] > res["eval"]["rows"]
    again = validate.run(cfg, tmp_path / "run2")  # same content and config: reused
    assert again["reused"] and again["fingerprint"] == res["fingerprint"]
