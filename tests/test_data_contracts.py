"""data_contracts: shapes, implicit->explicit, reject codes, EOS/BOS, truncation, files written."""

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from data_contracts.config import DataConfig
from data_contracts.encode import Encoded, truncate
from data_contracts.errors import DataError, DataPolicyError
from data_contracts.layouts import RowError, split_implicit
from data_contracts.validation import validate_split

MODEL = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K"
CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + eos_token + '\n' }}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
CFG = DataConfig(max_length=512, max_invalid_fraction=1.0)


def _load_tokenizer(template=None):
    if not (MODEL / "tokenizer.json").is_file():
        pytest.skip(f"needs the tiny model at {MODEL} (../shared beside the checkout)")
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(MODEL)
    tok.chat_template = template
    return tok


@pytest.fixture(scope="module")
def tok():
    return _load_tokenizer()


@pytest.fixture(scope="module")
def chat_tok():
    return _load_tokenizer(CHATML)


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def run(rows, tok, tmp_path, cfg=CFG, **kw):
    rep = validate_split(rows, tmp_path / "out", tok, cfg, **kw)
    valid = pq.read_table(tmp_path / "out" / "valid.parquet").to_pylist()
    rejects = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert rep["rows_in"] == rep["valid"] + rep["rejected"] + rep["duplicates"] + rep["limited_out"]
    return rep, valid, rejects


def msg(role, content):
    return {"role": role, "content": content}


# ------------------------------------------------------------------------------------------ shapes

def test_standard_explicit_golden(tok, tmp_path):
    rep, valid, _ = run([{"prompt": "Once upon a time", "chosen": " there was a cat.",
                          "rejected": " it rained.", "score": 3}], tok, tmp_path)
    (v,) = valid
    assert rep["layout"] == "preference" and not rep["is_conversational"]
    assert v["prompt_input_ids"] == [tok.bos_token_id] + ids(tok, "Once upon a time")
    assert v["chosen_input_ids"] == ids(tok, " there was a cat.") + [tok.eos_token_id]
    assert v["rejected_input_ids"] == ids(tok, " it rained.") + [tok.eos_token_id]
    assert json.loads(v["prompt"]) == "Once upon a time" and json.loads(v["meta"]) == {"score": 3}
    assert v["prompt_len"] == len(v["prompt_input_ids"]) and v["tools"] is None
    assert len(v["example_id"]) == 16 and v["source_index"] == 0 and v["is_conversational"] is False


def test_standard_implicit_golden(tok, tmp_path):
    _, valid, _ = run([{"chosen": "The sky is blue today.", "rejected": "The sky is red today."}],
                      tok, tmp_path)
    (v,) = valid
    assert json.loads(v["prompt"]) == "The sky is"  # the space before the split goes with completions
    assert json.loads(v["chosen"]) == " blue today." and json.loads(v["rejected"]) == " red today."


def test_implicit_split_rules():
    assert split_implicit("ab cd", "ab ce") == ("ab c", "d", "e")
    assert split_implicit("Hi there x", "Hi there y") == ("Hi there", " x", " y")
    a, b, c = [msg("user", "q")], msg("assistant", "yes"), msg("assistant", "no")
    assert split_implicit(a + [b], a + [c]) == (a, [b], [c])
    with pytest.raises(RowError) as e:
        split_implicit("same", "same")
    assert e.value.code == "IDENTICAL_PAIR"
    with pytest.raises(RowError) as e:
        split_implicit("Hello", "Hello world")
    assert e.value.code == "PREFIX_PAIR"


def test_conversational_explicit_golden(chat_tok, tmp_path):
    prompt = [msg("system", "Be brief."), msg("user", "Hi")]
    rep, valid, _ = run([{"prompt": prompt, "chosen": [msg("assistant", "Hello")],
                          "rejected": [msg("assistant", "Go away")]}], chat_tok, tmp_path)
    (v,) = valid
    eos = chat_tok.eos_token
    assert rep["is_conversational"] and v["is_conversational"]
    text = f"<|im_start|>system\nBe brief.{eos}\n<|im_start|>user\nHi{eos}\n<|im_start|>assistant\n"
    assert v["prompt_input_ids"] == ids(chat_tok, text)
    for side, content in (("chosen", "Hello"), ("rejected", "Go away")):
        full = ids(chat_tok, f"{text}{content}{eos}\n")
        got = v[f"{side}_input_ids"]
        assert full[:len(v["prompt_input_ids"]) + len(got)] == v["prompt_input_ids"] + got
        assert got[-1] == chat_tok.eos_token_id and got.count(chat_tok.eos_token_id) == 1  # "\n" dropped
        assert len(full) > len(v["prompt_input_ids"]) + len(got)
        assert chat_tok.decode(got, skip_special_tokens=True).strip() == content
    assert json.loads(v["prompt"]) == prompt


def test_conversational_implicit_golden(chat_tok, tmp_path):
    convo = [msg("user", "Hi"), msg("assistant", "Hello"), msg("user", "Bye")]
    _, valid, _ = run([{"chosen": convo + [msg("assistant", "Bye!")],
                        "rejected": convo + [msg("assistant", "No.")]}], chat_tok, tmp_path)
    (v,) = valid
    assert json.loads(v["prompt"]) == convo
    assert json.loads(v["chosen"]) == [msg("assistant", "Bye!")]


def test_sharegpt_and_hh_layouts(chat_tok, tmp_path):
    sg = [{"conversations": [{"from": "human", "value": "Hi"}], "system": "Be kind.",
           "chosen": {"from": "gpt", "value": "Hello"}, "rejected": {"from": "gpt", "value": "What"}}]
    rep, valid, _ = run(sg, chat_tok, tmp_path)
    assert rep["layout"] == "sharegpt"
    assert json.loads(valid[0]["prompt"]) == [msg("system", "Be kind."), msg("user", "Hi")]
    hh = [{"chosen": "\n\nHuman: Hi\n\nAssistant: Hello there", "rejected": "\n\nHuman: Hi\n\nAssistant: No"}]
    rep, valid, _ = run(hh, chat_tok, tmp_path)
    assert rep["layout"] == "hh"
    assert json.loads(valid[0]["prompt"]) == [msg("user", "Hi")]
    assert json.loads(valid[0]["chosen"]) == [msg("assistant", "Hello there")]


# ------------------------------------------------------------------------------------ reject codes

def test_reject_codes_and_counts(tok, tmp_path):
    good = {"prompt": "Once", "chosen": " a cat", "rejected": " a dog"}
    rows = [
        good,                                                   # 0 valid
        {"prompt": "Once", "chosen": " a cat"},                 # 1 MISSING_FIELD
        {"prompt": "Once", "chosen": 5, "rejected": "x"},       # 2 WRONG_TYPE
        {"prompt": "  ", "chosen": "a", "rejected": "b"},       # 3 EMPTY_PROMPT
        {"prompt": "Once", "chosen": "", "rejected": "b"},      # 4 EMPTY_COMPLETION
        {"prompt": "Once", "chosen": "same", "rejected": "same"},  # 5 IDENTICAL_PAIR
        dict(good),                                             # 6 DUPLICATE_ROW
        {"prompt": "word " * 600, "chosen": "a", "rejected": "b"},  # 7 PROMPT_TOO_LONG
        "not a row",                                            # 8 WRONG_TYPE
        {"__error__": "line 10: invalid JSON", "__raw__": "{"},  # 9 BAD_JSON
        {"prompt": "Twice", "chosen": " a cat", "rejected": " a dog"},  # 10 valid
    ]
    rep, valid, rejects = run(rows, tok, tmp_path)
    codes = {r["source_index"]: r["code"] for r in rejects}
    assert codes == {1: "MISSING_FIELD", 2: "WRONG_TYPE", 3: "EMPTY_PROMPT", 4: "EMPTY_COMPLETION",
                     5: "IDENTICAL_PAIR", 6: "DUPLICATE_ROW", 7: "PROMPT_TOO_LONG", 8: "WRONG_TYPE",
                     9: "BAD_JSON"}
    assert [v["source_index"] for v in valid] == [0, 10]
    assert (rep["rows_in"], rep["valid"], rep["rejected"], rep["duplicates"]) == (11, 2, 8, 1)
    assert rep["reject_counts"]["WRONG_TYPE"] == 2 and rep["invalid_fraction"] == round(8 / 11, 6)
    missing = next(r for r in rejects if r["code"] == "MISSING_FIELD")
    assert missing["field"] == "rejected" and json.loads(missing["raw"]) == rows[1]


def test_implicit_reject_codes(tok, tmp_path):
    rows = [{"chosen": "Hello", "rejected": "Hello world"}, {"chosen": "x y", "rejected": "x y"},
            {"chosen": "abc", "rejected": "xyz"}]
    _, _, rejects = run(rows, tok, tmp_path)
    assert [r["code"] for r in rejects] == ["PREFIX_PAIR", "IDENTICAL_PAIR", "EMPTY_PROMPT"]


def test_conversational_reject_codes(chat_tok, tok, tmp_path):
    u, a = msg("user", "Hi"), msg("assistant", "Hello")
    rows = [
        {"prompt": [u], "chosen": [a], "rejected": [msg("assistant", "No")]},          # 0 valid
        {"prompt": [msg("robot", "Hi")], "chosen": [a], "rejected": [msg("assistant", "No")]},
        {"prompt": [u, a], "chosen": [a], "rejected": [msg("assistant", "No")]},       # ends with assistant
        {"prompt": [u], "chosen": [u], "rejected": [a]},                               # completion by user
        {"prompt": [u, msg("system", "late")], "chosen": [a], "rejected": [msg("assistant", "No")]},
    ]
    _, valid, rejects = run(rows, chat_tok, tmp_path)
    assert len(valid) == 1
    assert [r["code"] for r in rejects] == ["UNKNOWN_ROLE"] + ["BAD_ROLE_ORDER"] * 3
    _, valid, rejects = run(rows[:1], tok, tmp_path)  # no chat template at all
    assert not valid and rejects[0]["code"] == "NO_CHAT_TEMPLATE"


def test_template_prefix_mismatch(tmp_path):
    bad = "{% if messages[-1]['role'] == 'assistant' %}FULL {% endif %}" + CHATML
    tok = _load_tokenizer(bad)
    rows = [{"prompt": [msg("user", "Hi")], "chosen": [msg("assistant", "A")],
             "rejected": [msg("assistant", "B")]}]
    _, valid, rejects = run(rows, tok, tmp_path)
    assert not valid and rejects[0]["code"] == "TEMPLATE_PREFIX_MISMATCH"


# ------------------------------------------------------------------------------------- policies

def test_policy_fail_raises_on_first_bad_row(tok, tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}]
    cfg = CFG.model_copy(update={"invalid_policy": "fail"})
    with pytest.raises(DataError, match=r"row 1 .*MISSING_FIELD.*'rejected'"):
        validate_split(rows, tmp_path, tok, cfg)


def test_policy_quarantine_threshold(tok, tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b"}]
    cfg = CFG.model_copy(update={"max_invalid_fraction": 0.2})
    with pytest.raises(DataPolicyError, match=r"1/2 rows rejected \(50\.0%.*MISSING_FIELD x1"):
        validate_split(rows, tmp_path, tok, cfg)
    rep = json.loads((tmp_path / "report.json").read_text())  # files are written before raising
    assert rep["policy_ok"] is False and rep["top_reasons"][0]["code"] == "MISSING_FIELD"


def test_limit_is_seeded_and_reconciles(tok, tmp_path):
    rows = [{"prompt": f"Story {i}", "chosen": " good", "rejected": " bad"} for i in range(20)]
    rep, valid, _ = run(rows, tok, tmp_path, limit=5)
    assert rep["valid"] == 5 and rep["limited_out"] == 15
    first = [v["source_index"] for v in valid]
    assert first == sorted(first)
    _, again, _ = run(rows, tok, tmp_path, limit=5)
    assert [v["source_index"] for v in again] == first
    cfg = CFG.model_copy(update={"shuffle_seed": 1, "train_limit": 5})
    _, other, _ = run(rows, tok, tmp_path, cfg=cfg)
    assert len(other) == 5 and [v["source_index"] for v in other] != first


# --------------------------------------------------------------------------------- EOS / BOS

def test_eos_once_and_no_double_bos(tok, chat_tok, tmp_path):
    eos, bos = tok.eos_token_id, tok.bos_token_id
    rows = [{"prompt": "<s>Once upon", "chosen": " a cat</s>", "rejected": " a dog</s></s>"}]
    _, (v,), _ = run(rows, tok, tmp_path)
    assert v["prompt_input_ids"][:2] != [bos, bos] and v["prompt_input_ids"][0] == bos
    for side in ("chosen", "rejected"):
        assert v[f"{side}_input_ids"][-1] == eos and v[f"{side}_input_ids"].count(eos) == 1
    with_bos = _load_tokenizer("{{ bos_token }}" + CHATML)
    rows = [{"prompt": [msg("user", "Hi")], "chosen": [msg("assistant", "Yes")],
             "rejected": [msg("assistant", "No")]}]
    _, (v,), _ = run(rows, with_bos, tmp_path)
    assert v["prompt_input_ids"][0] == bos and v["prompt_input_ids"][1] != bos
    assert v["chosen_input_ids"].count(eos) == 1 and v["chosen_input_ids"][-1] == eos


# ---------------------------------------------------------------------------------- truncation

def test_truncate_modes():
    enc = Encoded([1, 10, 11, 12, 13], [20, 21, 22, 2], [30, 2])
    ks = truncate(enc, 7, "keep_start", bos=1)
    assert (ks.prompt, ks.chosen, ks.rejected, ks.truncated) == ([1, 10, 11, 12, 13], [20, 21], [30, 2], 2)
    ke = truncate(enc, 7, "keep_end", bos=1)
    assert (ke.prompt, ke.chosen, ke.rejected, ke.truncated) == ([1, 12, 13], [20, 21, 22, 2], [30, 2], 2)
    long = Encoded([1, 10, 11, 12, 13], [20, 21, 22, 23, 24, 2], [30, 2])
    tight = truncate(long, 6, "keep_end", bos=1)  # prompt shrinks to BOS + 1 token, then completions cut
    assert (tight.prompt, tight.chosen, tight.rejected) == ([1, 13], [20, 21, 22, 23], [30, 2])
    with pytest.raises(RowError) as e:
        truncate(enc, 5, "keep_start", bos=1)
    assert e.value.code == "PROMPT_TOO_LONG"


def test_truncation_end_to_end(tok, tmp_path):
    rows = [{"prompt": "Once upon a time there was a boy", "chosen": " who loved to play with his ball",
             "rejected": " and a dog"}]
    p_len, c_len = len(ids(tok, rows[0]["prompt"])) + 1, len(ids(tok, rows[0]["chosen"])) + 1
    cfg = CFG.model_copy(update={"max_length": p_len + c_len - 3})
    rep, (v,), _ = run(rows, tok, tmp_path, cfg=cfg)  # keep_start: the completions lose their ends
    assert (v["prompt_len"], v["chosen_len"]) == (p_len, c_len - 3)
    assert rep["truncated"] == {"rows": 1, "tokens": 3 + max(0, v["rejected_len"] - (c_len - 3))}
    cfg = cfg.model_copy(update={"truncation_mode": "keep_end"})
    rep, (v,), _ = run(rows, tok, tmp_path, cfg=cfg)  # keep_end: the prompt loses its start, not BOS
    assert (v["prompt_len"], v["chosen_len"]) == (p_len - 3, c_len)
    assert v["prompt_input_ids"][0] == tok.bos_token_id and v["chosen_input_ids"][-1] == tok.eos_token_id
    assert v["prompt_input_ids"][1:] == ([tok.bos_token_id] + ids(tok, rows[0]["prompt"]))[4:]


# ------------------------------------------------------------------------------------- files

def test_files_and_columns(tok, tmp_path):
    rows = [{"prompt": "Once", "chosen": " a cat", "rejected": " a dog"}, {"prompt": "Once"}]
    rep = validate_split(rows, tmp_path / "o", tok, CFG, split="eval", name="mem")
    out = tmp_path / "o"
    assert sorted(p.name for p in out.iterdir()) == ["rejects.parquet", "report.json", "summary.md",
                                                    "valid.parquet"]
    schema = pq.read_schema(out / "valid.parquet")
    assert schema.names == ["example_id", "source_index", "prompt", "chosen", "rejected",
                            "is_conversational", "tools", "chat_template_kwargs", "meta", "prompt_input_ids",
                            "chosen_input_ids", "rejected_input_ids", "prompt_len", "chosen_len",
                            "rejected_len", "images"]
    assert str(schema.field("prompt_input_ids").type) == "list<element: int32>"
    assert str(schema.field("prompt_len").type) == "int32"
    assert str(schema.field("source_index").type) == "int64"
    rejects = pq.read_schema(out / "rejects.parquet")
    assert rejects.names == ["source_index", "code", "field", "message", "raw"]
    on_disk = json.loads((out / "report.json").read_text())
    assert on_disk == rep and rep["split"] == "eval" and rep["source"] == "mem"
    for key in ("rows_in", "valid", "rejected", "duplicates", "reject_counts", "lengths", "truncated",
                "fingerprint", "invalid_fraction", "policy_ok", "top_reasons"):
        assert key in rep
    assert set(rep["lengths"]["prompt"]) == {"min", "mean", "max", "p95"}
    again = validate_split(rows, tmp_path / "o2", tok, CFG, split="eval", name="mem")
    assert again["fingerprint"] == rep["fingerprint"]


# --------------------------------------------------------------------------- chat_template_kwargs

# Like Qwen3's template: the final assistant turn always carries an (empty) think block, the
# generation prompt only when enable_thinking is false: the kwarg moves the block from the
# completion the model learns into the prompt.
THINKING = ("{% for m in messages %}{% if m['role'] == 'assistant' and loop.last %}"
            "{{ '<|im_start|>assistant\n<think>\n\n</think>\n\n' + m['content'] + eos_token + '\n' }}"
            "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + eos_token + '\n' }}{% endif %}"
            "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
            "{% if enable_thinking is defined and not enable_thinking %}{{ '<think>\n\n</think>\n\n' }}"
            "{% endif %}{% endif %}")


def test_chat_template_kwargs_from_config_and_row(tmp_path):
    from data_contracts.config import ConfigError, load_config

    tok = _load_tokenizer(THINKING)
    pair = {"prompt": [msg("user", "Hi")], "chosen": [msg("assistant", "A")], "rejected": [msg("assistant", "B")]}
    rows = [pair, {**pair, "chat_template_kwargs": '{"enable_thinking": true}'},
            {**pair, "chat_template_kwargs": {"enable_thinking": False}}]
    eos = tok.eos_token
    plain = ids(tok, f"<|im_start|>user\nHi{eos}\n<|im_start|>assistant\n")
    no_think = ids(tok, f"<|im_start|>user\nHi{eos}\n<|im_start|>assistant\n<think>\n\n</think>\n\n")

    _, valid, _ = run(rows, tok, tmp_path / "default")
    assert [v["prompt_input_ids"] for v in valid] == [plain, plain, no_think]
    completions = [tok.decode(v["chosen_input_ids"], skip_special_tokens=True).strip() for v in valid]
    assert completions == ["<think>\n\n</think>\n\nA"] * 2 + ["A"]
    assert [v["chat_template_kwargs"] for v in valid] == [None, '{"enable_thinking": true}',
                                                          '{"enable_thinking": false}']
    assert len({v["example_id"] for v in valid}) == 3  # a row's kwargs are part of its content

    cfg = DataConfig(max_length=512, max_invalid_fraction=1.0, chat_template_kwargs={"enable_thinking": False})
    _, valid, _ = run(rows, tok, tmp_path / "config", cfg=cfg)  # the config's default; a row overrides it
    assert [v["prompt_input_ids"] for v in valid] == [no_think, plain, no_think]
    for v in valid:  # one EOS, at the end of each completion
        assert v["chosen_input_ids"][-1] == tok.eos_token_id and v["chosen_input_ids"].count(tok.eos_token_id) == 1

    with pytest.raises(ConfigError, match="chat_template_kwargs.*add_generation_prompt"):
        load_config(overrides={"data.chat_template_kwargs": {"add_generation_prompt": False}})


def test_bad_chat_template_kwargs_are_rejected_with_a_code(tmp_path):
    tok = _load_tokenizer(THINKING)
    pair = {"prompt": [msg("user", "Hi")], "chosen": [msg("assistant", "A")], "rejected": [msg("assistant", "B")]}
    rows = [{**pair, "chat_template_kwargs": "{not json"}, {**pair, "chat_template_kwargs": [1, 2]},
            {**pair, "chat_template_kwargs": {"tools": []}}, pair]
    rep, valid, rejects = run(rows, tok, tmp_path)
    assert len(valid) == 1 and [r["code"] for r in rejects] == ["INVALID_TEMPLATE_KWARGS"] * 3
    assert [r["source_index"] for r in rejects] == [0, 1, 2] and "tools" in rejects[2]["message"]
