"""Layouts common in public preference files (issue 14): message spellings, ShareGPT string
completions, conversation pairs, instruction sets with a system column, score columns and
min_score_margin. Golden rows; the tokenizer is the character-level one of tests/tiny.py."""

import json

import pyarrow.parquet as pq
import pytest
from tiny import tiny_tokenizer

from data_contracts.config import DataConfig
from data_contracts.examples import RowError
from data_contracts.layouts import detect_layout, to_example
from data_contracts.validation import validate_split

CFG = DataConfig(max_length=4096, max_invalid_fraction=1.0)
WEATHER = {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def msg(role, content):
    return {"role": role, "content": content}


def parse(rows, fmt="auto", **kw):
    """(layout, [Example or reject code per row])."""
    layout = detect_layout(rows, fmt, **kw)
    out = []
    for row in rows:
        try:
            out.append(to_example(row, layout))
        except RowError as e:
            out.append(e.code)
    return layout, out


def validate(rows, tmp_path, cfg=CFG):
    rep = validate_split(rows, tmp_path / "out", tiny_tokenizer(), cfg)
    valid = pq.read_table(tmp_path / "out" / "valid.parquet").to_pylist()
    rejects = pq.read_table(tmp_path / "out" / "rejects.parquet").to_pylist()
    assert rep["rows_in"] == rep["valid"] + rep["rejected"] + rep["duplicates"] + rep["limited_out"]
    return rep, valid, rejects


def test_message_spellings_are_normalised():
    row = {"prompt": [{"from": "system", "value": "Be brief."},
                      {"from": "human", "value": [{"type": "text", "value": "Hi "}, {"type": "text", "text": "there"}],
                       "loss_weight": 0.0}],
           "chosen": [{"from": "gpt", "value": "Hello!", "name": "bot"}],
           "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "Go away."}]}]}
    layout, (ex,) = parse([row])
    assert (layout.name, layout.conversational, layout.explicit) == ("preference", True, True)
    assert ex.prompt == [msg("system", "Be brief."), {"role": "user", "content": "Hi there", "loss_weight": 0.0}]
    assert ex.chosen == [{"role": "assistant", "content": "Hello!", "name": "bot"}]
    assert ex.rejected == [msg("assistant", "Go away.")]


def test_sharegpt_string_object_and_list_completions(tmp_path):
    convo = [{"from": "human", "value": "2+2?"}]
    rows = [{"conversations": convo, "chosen": "4", "rejected": "5", "system": "Answer tersely."},
            {"conversations": convo + [{"from": "gpt", "value": "4"}, {"from": "human", "value": "3+3?"}],
             "chosen": {"from": "gpt", "value": "6"}, "rejected": [{"from": "gpt", "value": "7"}]},
            {"conversations": convo, "chosen": 4, "rejected": "5"},                        # WRONG_TYPE
            {"conversations": [{"from": "robot", "value": "2+2?"}], "chosen": "4", "rejected": "5"},
            {"conversations": convo, "chosen": "4"}]                                        # MISSING_FIELD
    rep, valid, rejects = validate(rows, tmp_path)
    assert rep["layout"] == "sharegpt" and rep["is_conversational"]
    assert json.loads(valid[0]["prompt"]) == [msg("system", "Answer tersely."), msg("user", "2+2?")]
    assert json.loads(valid[0]["chosen"]) == [msg("assistant", "4")]
    assert json.loads(valid[0]["rejected"]) == [msg("assistant", "5")]
    assert json.loads(valid[1]["prompt"]) == [msg("user", "2+2?"), msg("assistant", "4"), msg("user", "3+3?")]
    assert (json.loads(valid[1]["chosen"]), json.loads(valid[1]["rejected"])) == (
        [msg("assistant", "6")], [msg("assistant", "7")])
    assert [(r["source_index"], r["code"], r["field"]) for r in rejects] == [
        (2, "WRONG_TYPE", "chosen"), (3, "UNKNOWN_ROLE", "conversations"), (4, "MISSING_FIELD", "rejected")]


def test_messages_prompt_column_and_tools_string_or_list():
    base = {"messages": [msg("user", "Weather in Oslo?")], "chosen": "Cold.", "rejected": "Hot."}
    layout, (a, b) = parse([dict(base, tools=json.dumps([WEATHER])), dict(base, tools=[WEATHER])])
    assert layout.name == "sharegpt" and "messages" in layout.reason
    assert a.prompt == [msg("user", "Weather in Oslo?")] and a.chosen == [msg("assistant", "Cold.")]
    assert a.tools == b.tools == [{"type": "function", "function": WEATHER}]


@pytest.mark.parametrize("side", ["messages", "conversations"])
def test_conversation_pair_prompt_is_the_shared_prefix(side):
    shared = [{"from": "human", "value": "Name a colour."}]
    rows = [{f"chosen_{side}": shared + [{"from": "gpt", "value": "Blue."}],
             f"rejected_{side}": shared + [{"from": "gpt", "value": "Seven."}], "id": 3},
            {f"chosen_{side}": shared, f"rejected_{side}": shared}]
    layout, (ex, bad) = parse(rows)
    assert (layout.name, layout.conversational, layout.explicit) == ("conversation_pair", True, False)
    assert (ex.prompt, ex.chosen, ex.rejected) == (
        [msg("user", "Name a colour.")], [msg("assistant", "Blue.")], [msg("assistant", "Seven.")])
    assert ex.meta == {"id": 3} and bad == "IDENTICAL_PAIR"


def test_instruction_with_system_column_end_to_end(tmp_path):
    rows = [{"system_prompt": "You are a poet.", "question": "Rhyme with cat", "chosen": "hat", "rejected": "dog"},
            {"system": "", "instruction": "Translate", "input": "chat", "chosen": "cat", "rejected": "hat"},
            {"system": 5, "question": "x", "chosen": "a", "rejected": "b"}]
    rep, valid, rejects = validate(rows, tmp_path)
    assert rep["layout"] == "instruction" and rep["is_conversational"]
    assert json.loads(valid[0]["prompt"]) == [msg("system", "You are a poet."), msg("user", "Rhyme with cat")]
    assert json.loads(valid[0]["chosen"]) == [msg("assistant", "hat")]
    assert json.loads(valid[1]["prompt"]) == [msg("user", "Translate\n\nchat")]
    assert json.loads(valid[1]["meta"]) == {}
    assert [(r["source_index"], r["code"]) for r in rejects] == [(2, "WRONG_TYPE")]
    tok = tiny_tokenizer()
    assert tok.decode(valid[0]["prompt_input_ids"]).startswith("<|im_start|>system\nYou are a poet.<|im_end|>")


def test_instruction_without_system_is_standard_and_format_overrides():
    rows = [{"instruction": "Say hi", "input": "politely", "chosen": " Hello.", "rejected": " Yo."}]
    layout, (ex,) = parse(rows)
    assert (layout.name, layout.conversational) == ("instruction", False)
    assert (ex.prompt, ex.chosen, ex.rejected) == ("Say hi\n\npolitely", " Hello.", " Yo.")
    prompt_rows = [{"prompt": "Say hi", "system": "Be kind.", "chosen": "Hello.", "rejected": "Yo."}]
    layout, (ex,) = parse(prompt_rows)
    assert layout.name == "instruction" and ex.prompt == [msg("system", "Be kind."), msg("user", "Say hi")]
    layout, (code,) = parse(rows, "sharegpt")
    assert layout.name == "sharegpt" and layout.reason == "named by data.format" and code == "MISSING_FIELD"


def test_score_columns_go_to_meta():
    pair = {"prompt": "Q", "chosen": " good", "rejected": " bad"}
    rows = [dict(pair, chosen_rating=9, rejected_rating=2.5, source="uf"),
            dict(pair, score_chosen=8.0, score_rejected=7.5),
            dict(pair, chosen_score=1, rejected_score=0),
            dict(pair, metadata={"score_chosen": 5, "score_rejected": 1})]
    _, exs = parse(rows)
    assert [ex.meta for ex in exs] == [
        {"source": "uf", "score_chosen": 9, "score_rejected": 2.5},
        {"score_chosen": 8.0, "score_rejected": 7.5},
        {"score_chosen": 1, "score_rejected": 0},
        {"metadata": {"score_chosen": 5, "score_rejected": 1}, "score_chosen": 5, "score_rejected": 1}]


def test_min_score_margin_drops_and_counts():
    pair = {"prompt": "Q", "chosen": " good", "rejected": " bad"}
    rows = [dict(pair, score_chosen=9, score_rejected=2), dict(pair, score_chosen=8, score_rejected=7.5),
            dict(pair, chosen_rating=3, rejected_rating=3), pair, {"prompt": "Q", "chosen": " good"}]
    assert DataConfig().min_score_margin is None
    margin = DataConfig(min_score_margin=1.0).min_score_margin
    _, out = parse(rows, min_score_margin=margin)
    codes = [x if isinstance(x, str) else "valid" for x in out]
    assert codes == ["valid", "SCORE_MARGIN_TOO_SMALL", "SCORE_MARGIN_TOO_SMALL", "valid", "MISSING_FIELD"]
    _, out = parse(rows)  # no margin: every scored pair kept
    assert [x if isinstance(x, str) else "valid" for x in out] == ["valid"] * 4 + ["MISSING_FIELD"]


def test_detection_reason_is_reported():
    assert "conversations" in detect_layout([{"conversations": [], "chosen": "a", "rejected": "b"}]).reason
    assert "implicit" in detect_layout([{"chosen": "a b", "rejected": "a c"}]).reason
    assert detect_layout([{"conversations": [], "chosen": "a"}]).name == "sharegpt"  # a row short of a side
    assert detect_layout([{"chosen_messages": []}]).name == "conversation_pair"


def test_min_score_margin_and_layout_reason_through_validate_split(tmp_path):
    """End to end: data.min_score_margin drops and counts pairs, report.json says why the layout."""
    pair = {"prompt": "Q", "chosen": " good", "rejected": " bad"}
    rows = [dict(pair, score_chosen=9, score_rejected=2), dict(pair, prompt="R", score_chosen=8, score_rejected=7.5)]
    cfg = DataConfig(max_length=4096, max_invalid_fraction=1.0, min_score_margin=1.0)
    rep, valid, rejects = validate(rows, tmp_path, cfg)
    assert (rep["valid"], rep["rejected"]) == (1, 1)
    assert [r["code"] for r in rejects] == ["SCORE_MARGIN_TOO_SMALL"]
    assert json.loads(valid[0]["meta"])["score_chosen"] == 9
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["layout"] == "preference" and report["layout_reason"]


def test_rejected_rows_keep_no_more_raw_text_than_configured(tmp_path):
    """rejects.parquet keeps at most data.max_text_chars characters of a rejected row's raw text."""
    long = "x" * 50_000
    rows = [{"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."},
            {"prompt": long, "chosen": " a", "rejected": " b"}]
    cfg = DataConfig(max_length=4096, max_invalid_fraction=1.0, max_text_chars=2_000)
    rep, _, rejects = validate(rows, tmp_path, cfg)
    assert rep["valid"] == 1 and [r["code"] for r in rejects] == ["TEXT_TOO_LONG"]
    raw = rejects[0]["raw"]
    assert raw.startswith('{"prompt": "xxx') and len(raw) < 2_100 and "characters in all" in raw
    assert all(len(r["example"]) <= 200 for r in rep["top_reasons"])


def test_every_layout_is_a_declarative_description():
    """Each layout is a row of LAYOUTS (columns, spellings, signatures), parsed by one mechanism; and
    detection picks each one from a row with its signature."""
    from data_contracts.layouts import LAYOUTS, Shape

    assert all(isinstance(s, Shape) for s in LAYOUTS.values())
    assert set(LAYOUTS) == {"preference", "openai", "sharegpt", "conversation_pair", "instruction", "hh"}
    rows = {
        "openai": {"input": {"messages": [msg("user", "Hi")]}, "preferred_output": [msg("assistant", "Hello")],
                   "non_preferred_output": [msg("assistant", "Go")]},
        "conversation_pair": {"chosen_messages": [msg("user", "Hi"), msg("assistant", "Hello")],
                              "rejected_messages": [msg("user", "Hi"), msg("assistant", "Go")]},
        "sharegpt": {"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "Hello"},
                     "rejected": {"from": "gpt", "value": "Go"}},
        "instruction": {"system": "Be kind.", "question": "Hi", "chosen": "Hello", "rejected": "Go"},
        "hh": {"chosen": "\n\nHuman: Hi\n\nAssistant: Hello", "rejected": "\n\nHuman: Hi\n\nAssistant: Go"},
        "preference": {"prompt": "Hi", "chosen": " Hello", "rejected": " Go"},
    }
    for name, row in rows.items():
        layout, (ex,) = parse([row])
        assert layout.name == name and not isinstance(ex, str), (name, ex)
        assert ex.chosen != ex.rejected and ex.prompt
