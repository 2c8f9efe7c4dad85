"""The bundled answer-format dataset: deterministic generation, sizes, disjoint splits, judge."""

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_contracts import builtin
from data_contracts.builtin import DATASET_VERSION, SYSTEM, generate, judge, materialize
from data_contracts.sources import load_rows

MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + eos_token + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def splits():
    return generate(seed=0)


def question(row):
    return row["prompt"][-1]["content"]


def test_deterministic_sizes_and_disjoint(splits):
    train, eval_ = splits
    assert (train, eval_) == generate(seed=0)
    assert generate(seed=1) != (train, eval_)
    assert len(train) >= 1500 and len(eval_) == 300
    qs_train, qs_eval = [question(r) for r in train], [question(r) for r in eval_]
    assert len(set(qs_train)) == len(qs_train) and len(set(qs_eval)) == len(qs_eval)
    assert not set(qs_train) & set(qs_eval)
    assert len(Counter(r["family"] for r in train)) >= 8


def test_row_shape_and_preferences(splits):
    train, eval_ = splits
    kept_format = continues = 0
    for row in train + eval_:
        assert set(row) == {"prompt", "chosen", "rejected", "answer", "family"}
        assert row["prompt"] == [{"role": "system", "content": SYSTEM},
                                 {"role": "user", "content": question(row)}]
        assert row["chosen"] == [{"role": "assistant", "content": f"Answer: {row['answer']}"}]
        assert len(row["rejected"]) == 1 and row["rejected"][0]["role"] == "assistant"
        assert judge(row["prompt"], row["chosen"][0]["content"], row) == 1.0
        score = judge(row["prompt"], row["rejected"][0]["content"], row)
        assert score < 1.0
        kept_format += score == 0.5
        head, sep, tail = row["rejected"][0]["content"].partition("\n")
        if head == row["chosen"][0]["content"]:  # the right answer line, then the turn goes on
            assert sep and tail.strip() and score == 0.0
            continues += 1
    n = len(train + eval_)
    assert 0.12 < kept_format / n < 0.28  # ~20% keep the format, wrong answer
    assert 0.28 < continues / n < 0.42  # ~35% teach to stop after the answer line
    assert 0.28 < sum(r["rejected"][0]["content"].startswith(r["chosen"][0]["content"] + "\n")
                      for r in train[:256]) / 256 < 0.42  # also in the default run's 256 pairs
    assert max(len(r["rejected"][0]["content"]) for r in train) < 80


def test_judge_hand_examples():
    row = {"answer": "Paris"}
    assert judge(None, "Answer: Paris", row) == 1.0
    assert judge(None, "  Answer: paris.  \n", row) == 1.0
    assert judge(None, "Answer: Lyon", row) == 0.5
    assert judge(None, "The answer is Paris.", row) == 0.0
    assert judge(None, "answer: Paris", row) == 0.0
    assert judge(None, "Answer: Paris\nAnything else?", row) == 0.0
    assert judge(None, "Answer:Paris", row) == 0.0
    assert judge(None, "", row) == 0.0
    assert judge(None, "Answer: 42", {"meta": json.dumps({"answer": "42", "family": "add"})}) == 1.0
    assert judge(None, "Answer: 42", {}) == 0.5
    # where the answer is a spelling, case counts (row column or validated meta)
    assert judge(None, "Answer: TRAIN", {"answer": "train", "family": "lower"}) == 0.5
    assert judge(None, "Answer: train.", {"answer": "train", "family": "lower"}) == 1.0
    assert judge(None, "Answer: Train", {"meta": json.dumps({"answer": "train", "family": "repeat"})}) == 0.5
    assert judge(None, "Answer: paris", {"answer": "Paris", "family": "capital"}) == 1.0


def test_families_are_answerable_and_case_is_taught(splits):
    train, eval_ = splits
    fams = Counter(r["family"] for r in train + eval_)
    assert set(fams) == set(builtin.QUOTAS) and all(n >= 50 for n in fams.values())
    # a lowercase question's wrong answers include the uppercase word (what the model tends to echo)
    lower = [r for r in train if r["family"] == "lower"]
    assert any(r["rejected"][0]["content"] == f"Answer: {r['answer'].upper()}" for r in lower)
    for r in train + eval_:  # each wrong answer differs from the right one as the judge compares
        assert judge(None, r["rejected"][0]["content"], r) < 1.0


def test_materialize_idempotent_and_loadable(tmp_path, monkeypatch, splits):
    paths = materialize(tmp_path / "ds")
    assert set(paths) == {"train", "eval"}
    stamp = {k: p.stat().st_mtime_ns for k, p in paths.items()}
    assert materialize(tmp_path / "ds") == paths
    assert {k: p.stat().st_mtime_ns for k, p in paths.items()} == stamp
    assert not [p for p in (tmp_path / "ds").iterdir() if ".tmp" in p.name]  # temporary files: .<name>.tmp<pid>
    monkeypatch.setenv("DPO_HOME", str(tmp_path / "home"))
    assert load_rows("builtin:answer-format") == splits[0]
    assert load_rows("builtin:answer-format@eval") == splits[1]
    folder = tmp_path / "home" / "datasets" / f"answer-format-{DATASET_VERSION}"
    assert builtin.default_folder() == folder and (folder / "eval.jsonl").is_file()


def test_builtin_validates_clean(tmp_path, monkeypatch):
    if not (MODEL / "tokenizer.json").is_file():
        pytest.skip(f"needs the tiny model at {MODEL} (../shared beside the checkout)")
    from transformers import AutoTokenizer
    from data_contracts.config import DataConfig
    from data_contracts.validation import validate_split
    monkeypatch.setenv("DPO_HOME", str(tmp_path / "home"))
    tok = AutoTokenizer.from_pretrained(MODEL)
    tok.chat_template = CHATML
    rep = validate_split("builtin:answer-format@eval", tmp_path / "eval", tok, DataConfig(), split="eval")
    assert (rep["rows_in"], rep["valid"], rep["rejected"], rep["duplicates"]) == (300, 300, 0, 0)
    assert rep["is_conversational"] and rep["truncated"]["rows"] == 0 and rep["policy_ok"]
    # a rejected answer that goes on after the right answer line shares the chosen tokens up to the
    # end of turn, where chosen has EOS and rejected does not: the pair's only signal is the stop
    rows = pq.read_table(tmp_path / "eval" / "valid.parquet").to_pylist()
    stops = 0
    for r in rows:
        c, rj = r["chosen_input_ids"], r["rejected_input_ids"]
        assert c[-1] == rj[-1] == tok.eos_token_id and c.count(tok.eos_token_id) == 1
        if json.loads(r["rejected"])[0]["content"].startswith(json.loads(r["chosen"])[0]["content"] + "\n"):
            assert rj[:len(c) - 1] == c[:-1] and rj[len(c) - 1] != tok.eos_token_id
            stops += 1
    assert stops > 0.25 * len(rows)
