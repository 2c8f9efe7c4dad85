"""Real public preference files, one per row layout, through the real validator.

``tests/data/public/`` holds small byte-for-byte copies of public files (README.md there names each
source, commit and licence); ``../shared/data`` holds three larger public samples (those tests skip
with a reason when it is absent). Every count asserted here was measured on these files, and every
reject was looked at: see the comments next to the expected rejects. The tokenizer is the
character-level ChatML one of tests/tiny.py, so ``max_length`` is large enough for whole rows.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from tiny import tiny_tokenizer

from data_contracts.config import DataConfig
from data_contracts.validation import validate_split

PUBLIC = Path(__file__).resolve().parent / "data" / "public"
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
CFG = DataConfig(max_length=65536, max_invalid_fraction=1.0)
needs_shared = pytest.mark.skipif(not SHARED_DATA.is_dir(),
                                  reason=f"needs {SHARED_DATA} (../shared/data beside the checkout)")


def msg(role, content):
    return {"role": role, "content": content}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def validate(path, out, tok):
    """validate_split on one file -> (report, valid rows, {source_index: (code, field)} of rejects)."""
    rep = validate_split(path, out, tok, CFG)
    valid = pq.read_table(out / "valid.parquet").to_pylist()
    rejects = {r["source_index"]: (r["code"], r["field"]) for r in pq.read_table(out / "rejects.parquet").to_pylist()}
    assert rep["rows_in"] == rep["valid"] + rep["rejected"] + rep["duplicates"] + rep["limited_out"]
    assert len(valid) == rep["valid"] and len(rejects) == rep["rejected"] + rep["duplicates"]
    return rep, valid, rejects


def counts(rep):
    return rep["layout"], rep["is_conversational"], rep["rows_in"], rep["valid"], rep["rejected"], rep["duplicates"]


def loads(row, *keys):
    return [json.loads(row[k]) for k in keys]


# ---- tests/data/public: one file per layout ---------------------------------------------------------

def test_every_public_file_is_documented():
    readme = (PUBLIC / "README.md").read_text()
    files = sorted(p.name for p in PUBLIC.iterdir() if p.name != "README.md")
    assert files and all(f"`{name}`" in readme for name in files), files


def test_preference_conversational_implicit_torchtune(tok, tmp_path):
    """TRL columns, whole conversations per side: the prompt is the shared first (user) turn."""
    rep, valid, rejects = validate(PUBLIC / "torchtune_hh_rlhf_tiny.json", tmp_path, tok)
    assert counts(rep) == ("preference", True, 1, 1, 0, 0) and rejects == {}
    assert "implicit prompt, conversational" in rep["layout_reason"]
    prompt, chosen, rejected = loads(valid[0], "prompt", "chosen", "rejected")
    assert prompt == [msg("user", "What do I do when I have a hole in my trousers?")]
    assert (chosen, rejected) == ([msg("assistant", "Fix the hole.")], [msg("assistant", "Take them off.")])


def test_preference_string_prompt_message_completions_oumi(tok, tmp_path):
    """TRL columns, explicit: a string prompt with message-list completions and an ``images`` column
    (URLs): recognised as vision rows, each rejected by name when validated for a text-only model."""
    rep, valid, rejects = validate(PUBLIC / "oumi_vision_language_dpo_format.jsonl", tmp_path, tok)
    assert counts(rep) == ("preference", True, 3, 0, 3, 0)
    assert set(rejects.values()) == {("IMAGE_NEEDS_VISION_MODEL", "images")}, rejects
    assert "explicit prompt, conversational" in rep["layout_reason"]


def test_openai_preference_intel_orca(tok, tmp_path):
    """OpenAI preference fine-tuning rows (Intel/orca_dpo_pairs as converted by Microsoft Foundry)."""
    rep, valid, rejects = validate(PUBLIC / "microsoft_foundry_dpo_intel_orca_training.jsonl", tmp_path, tok)
    assert counts(rep) == ("openai", True, 2, 2, 0, 0) and rejects == {}
    for row in valid:
        prompt, chosen, rejected = loads(row, "prompt", "chosen", "rejected")
        assert [m["role"] for m in prompt] == ["system", "user"]
        assert prompt[0]["content"].startswith("You are an AI assistant. User will you give you a task.")
        assert [m["role"] for m in chosen] == [m["role"] for m in rejected] == ["assistant"]
        assert row["tools"] is None and json.loads(row["meta"]) == {}
    prompt, chosen, rejected = loads(valid[1], "prompt", "chosen", "rejected")
    assert prompt[1]["content"].startswith("Premise: A man is inline skating in front of a wooden bench.")
    assert chosen[0]["content"].startswith("b). it is not possible to tell\n\nJustification:")
    assert rejected[0]["content"].startswith('Based on the premise "A man is inline skating')
    assert tok.decode(valid[0]["prompt_input_ids"]).startswith("<|im_start|>system\nYou are an AI assistant.")


def test_instruction_via_column_mapping_stack_exchange_cli(dpo_home, tmp_path):
    """Stack Exchange paired (question/response_j/response_k, as torchtune ships it) through the CLI
    with data.columns mapping its sides: an instruction row without a system column (standard)."""
    tok_dir = tmp_path / "tok"
    tiny_tokenizer().save_pretrained(tok_dir)
    src = PUBLIC / "torchtune_stack_exchange_paired_tiny_head1.jsonl"
    out = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(src), "--out", str(tmp_path / "o"),
                          "--tokenizer", str(tok_dir), "--max-length", "8192",
                          "--set", "data.columns={chosen: response_j, rejected: response_k}"],
                         check=False, capture_output=True, text=True, env=dict(os.environ), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "1/1 valid, 0 rejected" in out.stdout, out.stdout
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert (report["layout"], report["is_conversational"], report["rows_in"], report["valid"]) == (
        "instruction", False, 1, 1)
    raw = json.loads(src.read_text())
    (row,) = pq.read_table(tmp_path / "o" / "valid.parquet").to_pylist()
    assert loads(row, "prompt", "chosen", "rejected") == [raw["question"], raw["response_j"], raw["response_k"]]
    assert json.loads(row["meta"]) == {}


# ---- ../shared/data: the larger public samples -------------------------------------------------------

# hh-rlhf harmless-base test: 4 of 2,312 rows rejected, each looked at.
HH_EMPTY_CHOSEN = [86, 516, 925, 1103]  # chosen ends "\n\nAssistant: " with no reply at all
# Two assistant turns in a row are kept (TRL keeps them too): genuine ones ("I will get back to you in
# a moment.\n\nAssistant: Hey, sorry about that.", rows 1319, 1849 in the shared history, 1952 in the
# chosen completion), and those of transcripts whose turn markers are broken (an inline "  Human:"
# without the "\n\n" separator: 667, 1254, 1688, 2036 in chosen, 1950 in rejected; a human's message
# labelled "Assistant:": 763): the pair is still the source's pair, text as written.
HH_TWO_ASSISTANT_TURNS = [667, 763, 1254, 1319, 1688, 1849, 1950, 1952, 2036]


@needs_shared
def test_hh_rlhf_harmless_base(tok, tmp_path):
    rep, _, rejects = validate(SHARED_DATA / "hh-rlhf-harmless-base" / "test.jsonl.gz", tmp_path, tok)
    assert rep["layout"] == "hh" and rep["is_conversational"] and "HH transcript" in rep["layout_reason"]
    assert (rep["rows_in"], rep["duplicates"]) == (2312, 0)
    assert rejects == {i: ("EMPTY_COMPLETION", "chosen") for i in HH_EMPTY_CHOSEN}
    assert rep["valid"] == 2312 - len(HH_EMPTY_CHOSEN)
    assert not set(HH_TWO_ASSISTANT_TURNS) & set(rejects)
    assert rep["reject_counts"]["EMPTY_COMPLETION"] == 4


@needs_shared
@pytest.mark.parametrize("name, rows_in, expected", [
    # 306/655/910/997 (train) and 43 (eval): chosen == rejected in the source; 478: the rejected
    # completion is ""; 833: the chosen completion is "" (a Gujarati->Oriya translation left blank).
    ("train_clean.jsonl", 1000, {306: ("IDENTICAL_PAIR", "chosen"), 478: ("EMPTY_COMPLETION", "rejected"),
                                 655: ("IDENTICAL_PAIR", "chosen"), 833: ("EMPTY_COMPLETION", "chosen"),
                                 910: ("IDENTICAL_PAIR", "chosen"), 997: ("IDENTICAL_PAIR", "chosen")}),
    ("eval_clean.jsonl", 200, {43: ("IDENTICAL_PAIR", "chosen")}),
])
def test_ultrafeedback_binarized_sample(tok, tmp_path, name, rows_in, expected):
    rep, valid, rejects = validate(SHARED_DATA / "ultrafeedback-binarized-sample" / name, tmp_path, tok)
    assert counts(rep) == ("preference", False, rows_in, rows_in - len(expected), len(expected), 0)
    assert "explicit prompt, standard" in rep["layout_reason"] and rejects == expected
    meta = json.loads(valid[0]["meta"])  # metadata.score_* become the pair's scores
    assert meta["score_chosen"] == meta["metadata"]["score_chosen"]
    assert meta["score_rejected"] == meta["metadata"]["score_rejected"]


@needs_shared
def test_llamafactory_sharegpt_demo(tok, tmp_path):
    rep, valid, rejects = validate(SHARED_DATA / "llamafactory-sharegpt" / "dpo_en_demo.json", tmp_path, tok)
    # five rows repeat an earlier row exactly (157=13, 186=111, 230=84, 248=28, 275=117)
    assert counts(rep) == ("sharegpt", True, 300, 295, 0, 5)
    assert rejects == {i: ("DUPLICATE_ROW", "<row>") for i in (157, 186, 230, 248, 275)}
    roles = {tuple(m["role"] for m in json.loads(v["prompt"])) for v in valid}
    assert any(r[0] == "system" for r in roles) and max(len(r) for r in roles) > 1
    assert all(json.loads(v["chosen"])[0]["role"] == "assistant" for v in valid)
