"""data_contracts on the real public samples in ../shared/data (skipped when ../shared is absent)."""

from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_contracts.config import DataConfig
from data_contracts.validation import validate_split

SHARED = Path(__file__).resolve().parents[2] / "shared"
MODEL = SHARED / "models" / "stories260K"
DATA = SHARED / "data"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + eos_token + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CFG = DataConfig(max_length=65536, max_invalid_fraction=1.0)

pytestmark = pytest.mark.skipif(not (MODEL / "tokenizer.json").is_file() or not DATA.is_dir(),
                                reason=f"needs {SHARED} (shared data and tiny model beside the checkout)")


@pytest.fixture(scope="module")
def tok():
    from transformers import AutoTokenizer
    t = AutoTokenizer.from_pretrained(MODEL)
    t.chat_template = CHATML
    return t


def reconciles(rep):
    return rep["rows_in"] == rep["valid"] + rep["rejected"] + rep["duplicates"] + rep["limited_out"]


def test_ultrafeedback_identical_pairs_rejected(tok, tmp_path):
    rep = validate_split(DATA / "ultrafeedback-binarized-sample" / "train_clean.jsonl", tmp_path, tok, CFG)
    rejects = pq.read_table(tmp_path / "rejects.parquet").to_pylist()
    identical = sorted(r["source_index"] for r in rejects if r["code"] == "IDENTICAL_PAIR")
    assert len(identical) == 4 and rep["reject_counts"]["IDENTICAL_PAIR"] == 4
    assert rep["rows_in"] == 1000 and reconciles(rep) and rep["layout"] == "preference"
    assert not rep["is_conversational"] and rep["valid"] >= 990


def test_hh_rows_all_accounted_for(tok, tmp_path):
    rep = validate_split(DATA / "hh-rlhf-harmless-base" / "test.jsonl.gz", tmp_path, tok, CFG)
    assert rep["layout"] == "hh" and rep["is_conversational"]
    assert rep["rows_in"] == 2312 and reconciles(rep) and rep["valid"] >= 2290
    valid = pq.read_table(tmp_path / "valid.parquet", columns=["chosen_input_ids"]).to_pylist()
    assert all(v["chosen_input_ids"][-1] == tok.eos_token_id for v in valid)
    rejects = pq.read_table(tmp_path / "rejects.parquet").to_pylist()
    assert len(rejects) == rep["rejected"] + rep["duplicates"]


def test_sharegpt_demo(tok, tmp_path):
    rep = validate_split(DATA / "llamafactory-sharegpt" / "dpo_en_demo.json", tmp_path, tok, CFG)
    assert rep["layout"] == "sharegpt" and rep["rows_in"] == 300 and reconciles(rep)
    assert rep["valid"] >= 290
