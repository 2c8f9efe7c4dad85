"""data_contracts: named adapters (OpenAI, ShareGPT tools), column mapping, tools and roles, the EOS
check, streaming. Uses the character-level tokenizer of tests/tiny.py (no files needed)."""

import json
import resource

import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from data_contracts import sources
from data_contracts.validation import encoding as encode_mod, holdout as holdout_mod, split as split_mod
from data_contracts.config import ConfigError, DataConfig, ModelConfig
from data_contracts.layouts import detect_layout, map_columns
from data_contracts.templating import configure_eos, turn_end_problem
from data_contracts.validation import SeenIds, validate_split
from tiny import tiny_tokenizer

TOOL_CHATML = (
    "{% if tools %}<|im_start|>system\nTools:{% for t in tools %} {{ t.function.name }}{% endfor %}"
    "<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
    "{% for c in m.tool_calls or [] %}<call>{{ c.function.name }}({{ c.function.arguments | tojson }})"
    "</call>{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CFG = DataConfig(max_length=4096, max_invalid_fraction=1.0)
WEATHER = {"name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


@pytest.fixture(scope="module")
def tok():
    t = tiny_tokenizer()
    t.chat_template = TOOL_CHATML
    return t


def msg(role, content, **kw):
    return {"role": role, "content": content, **kw}


def run(rows, tok, tmp_path, cfg=CFG, **kw):
    """validate_split + read both outputs + check the counts (shared helper, this file's CFG)."""
    from test_data_contracts import run as validate_and_read

    return validate_and_read(rows, tok, tmp_path, cfg, **kw)


def text(tok, ids):
    return tok.decode(ids)


# ------------------------------------------------------------------------------------- OpenAI

OPENAI_ROW = {
    "input": {"messages": [msg("system", "Be brief."), msg("user", "Weather in Paris?")],
              "tools": [{"type": "function", "function": WEATHER}], "parallel_tool_calls": False},
    "preferred_output": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]}],
    "non_preferred_output": [{"role": "assistant", "content": [{"type": "text", "text": "It is "},
                                                               {"type": "text", "text": "sunny."}]}],
    "id": 7,
}


def test_openai_golden(tok, tmp_path):
    rep, (v,), _ = run([OPENAI_ROW], tok, tmp_path)
    assert rep["layout"] == "openai" and rep["is_conversational"]
    assert json.loads(v["prompt"]) == OPENAI_ROW["input"]["messages"]
    call = {"type": "function", "id": "call_1",
            "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
    assert json.loads(v["chosen"]) == [{"role": "assistant", "content": "", "tool_calls": [call]}]
    assert json.loads(v["rejected"]) == [msg("assistant", "It is sunny.")]
    assert json.loads(v["tools"]) == [{"type": "function", "function": WEATHER}]
    assert json.loads(v["meta"]) == {"id": 7, "input.parallel_tool_calls": False}
    prompt = text(tok, v["prompt_input_ids"])
    assert prompt.startswith("<|im_start|>system\nTools: get_weather<|im_end|>")  # tools reached the template
    assert prompt.endswith("Weather in Paris?<|im_end|>\n<|im_start|>assistant\n")
    assert text(tok, v["chosen_input_ids"]) == '<call>get_weather({"city": "Paris"})</call><|im_end|>'
    assert text(tok, v["rejected_input_ids"]) == "It is sunny.<|im_end|>"


def test_explicit_format_overrides_detection(tok, tmp_path):
    assert detect_layout([OPENAI_ROW]).name == "openai"
    assert detect_layout([OPENAI_ROW], "openai").name == "openai"
    _, valid, rejects = run([OPENAI_ROW], tok, tmp_path, CFG.model_copy(update={"format": "sharegpt"}))
    assert not valid and rejects[0]["code"] == "MISSING_FIELD" and rejects[0]["field"] == "conversations"


# ------------------------------------------------------------------------------------- ShareGPT

def test_sharegpt_function_call_and_observation(tok, tmp_path):
    row = {"conversations": [{"from": "human", "value": "Weather in Oslo?"},
                             {"from": "function_call", "value": json.dumps(
                                 {"name": "get_weather", "arguments": {"city": "Oslo"}})},
                             {"from": "observation", "value": "{\"temp\": -3}"}],
           "chosen": {"from": "gpt", "value": "It is -3 degrees."},
           "rejected": {"from": "gpt", "value": "No idea."},
           "tools": json.dumps([WEATHER])}
    bad = dict(row, conversations=[row["conversations"][0],
                                   {"from": "function_call", "value": "get_weather(Oslo)"},
                                   row["conversations"][2]])
    rep, valid, rejects = run([row, bad], tok, tmp_path)
    assert rep["layout"] == "sharegpt"
    prompt = json.loads(valid[0]["prompt"])
    assert [m["role"] for m in prompt] == ["user", "assistant", "tool"]
    assert prompt[1]["tool_calls"] == [{"type": "function", "function": {"name": "get_weather",
                                                                         "arguments": {"city": "Oslo"}}}]
    assert prompt[2] == msg("tool", "{\"temp\": -3}")
    assert json.loads(valid[0]["tools"]) == [{"type": "function", "function": WEATHER}]
    assert '<call>get_weather({"city": "Oslo"})</call>' in text(tok, valid[0]["prompt_input_ids"])
    assert [r["code"] for r in rejects] == ["INVALID_TOOL_CALL"]


# ------------------------------------------------------------------------------------- columns

def test_column_mapping(tok, tmp_path):
    rows = [{"question": "Q1", "good": " yes", "bad": " no", "extra": {"q": "nested"}, "n": 1}]
    cfg = CFG.model_copy(update={"columns": {"prompt": "question", "chosen": "good", "rejected": "bad"}})
    rep, (v,), _ = run(rows, tok, tmp_path, cfg)
    assert rep["layout"] == "preference" and not rep["is_conversational"]
    assert (json.loads(v["prompt"]), json.loads(v["chosen"])) == ("Q1", " yes")
    assert json.loads(v["meta"]) == {"extra": {"q": "nested"}, "n": 1}
    assert text(tok, v["chosen_input_ids"]) == " yes<|im_end|>"
    # applied before detection: a mapped OpenAI-like layout; dotted sources read nested fields
    assert map_columns({"a": {"q": "x"}, "c": 1}, {"prompt": "a.q", "chosen": "c"}) == \
        {"a": {"q": "x"}, "prompt": "x", "chosen": 1}
    assert map_columns({"chosen": 1, "rejected": 2}, {"chosen": "rejected", "rejected": "chosen"}) == \
        {"chosen": 2, "rejected": 1}
    mapped = {"columns": {"input": "request", "preferred_output": "win", "non_preferred_output": "lose"}}
    row = {"request": OPENAI_ROW["input"], "win": OPENAI_ROW["preferred_output"],
           "lose": OPENAI_ROW["non_preferred_output"]}
    rep, valid, _ = run([row], tok, tmp_path, CFG.model_copy(update=mapped))
    assert rep["layout"] == "openai" and len(valid) == 1


def test_column_mapping_config_errors():
    with pytest.raises(ValidationError, match="unknown target column 'answer'"):
        DataConfig(columns={"answer": "x"})
    with pytest.raises(ValidationError, match="mapped twice"):
        DataConfig(columns={"chosen": "x", "rejected": "x"})


# ------------------------------------------------------------------------------------- tools / roles

def test_tools_and_role_reject_codes(tok, tmp_path):
    u, a, b = msg("user", "Hi"), [msg("assistant", "Hello")], [msg("assistant", "Go")]
    call = msg("assistant", "", tool_calls=[{"name": "f", "arguments": {}}])
    rows = [
        {"prompt": [u], "chosen": a, "rejected": b, "tools": json.dumps([WEATHER])},  # 0 valid
        {"prompt": [u], "chosen": a, "rejected": b, "tools": "[{not json"},          # 1
        {"prompt": [u], "chosen": a, "rejected": b, "tools": [{"description": "x"}]},  # 2 no name
        {"prompt": [u], "chosen": a, "rejected": b, "tools": "42"},                  # 3 not a list
        {"prompt": [msg("robot", "Hi")], "chosen": a, "rejected": b},                # 4
        {"prompt": [u, msg("tool", "42")], "chosen": a, "rejected": b},              # 5 tool w/o call
        {"prompt": [u], "chosen": [msg("assistant", "a"), u, msg("assistant", "b")], "rejected": b},  # 6
        {"prompt": [u, msg("assistant", "x")], "chosen": a, "rejected": b},          # 7 prompt ends
        {"prompt": [u], "chosen": [msg("assistant", "", tool_calls="{bad")], "rejected": b},  # 8
        {"prompt": [u, call, msg("tool", "42")], "chosen": a, "rejected": b},        # 9 valid
        {"prompt": [u], "chosen": [call, msg("tool", "1"), msg("assistant", "done")], "rejected": b},  # 10 valid
        {"prompt": [msg("user", "Hi", tool_calls=[{"name": "f"}])], "chosen": a, "rejected": b},  # 11
    ]
    _, valid, rejects = run(rows, tok, tmp_path)
    codes = {r["source_index"]: r["code"] for r in rejects}
    assert codes == {1: "INVALID_TOOLS", 2: "INVALID_TOOLS", 3: "INVALID_TOOLS", 4: "UNKNOWN_ROLE",
                     5: "BAD_ROLE_ORDER", 6: "BAD_ROLE_ORDER", 7: "BAD_ROLE_ORDER",
                     8: "INVALID_TOOL_CALL", 11: "INVALID_TOOL_CALL"}
    assert [v["source_index"] for v in valid] == [0, 9, 10]


def test_string_prompt_and_repeated_prompt_turns(tok, tmp_path):
    row = {"prompt": "Hi", "chosen": [msg("user", "Hi"), msg("assistant", "Hello")],
           "rejected": [msg("user", "Hi"), msg("assistant", "Bye")]}  # UltraFeedback-binarized style
    _, (v,), _ = run([row], tok, tmp_path)
    assert json.loads(v["prompt"]) == [msg("user", "Hi")]
    assert json.loads(v["chosen"]) == [msg("assistant", "Hello")]


# ------------------------------------------------------------------------------------- EOS check

def test_eos_override_checked_against_template():
    t = tiny_tokenizer()
    assert turn_end_problem(t) is None
    configure_eos(t, "<|im_end|>")
    assert t.eos_token == "<|im_end|>"
    with pytest.raises(ConfigError, match=r"ends an assistant turn with '<\|im_end\|>', not with "
                                          r"eos_token '<pad>'.*model.eos_token"):
        configure_eos(tiny_tokenizer(), "<pad>")
    with pytest.raises(ConfigError, match="not a single token"):
        configure_eos(tiny_tokenizer(), "<|eot|>")
    t = tiny_tokenizer()
    t.eos_token = "<pad>"
    with pytest.warns(UserWarning, match="not with eos_token '<pad>'"):
        configure_eos(t, None)  # no override: a mismatch only warns
    t.chat_template = None
    configure_eos(t, "<pad>")  # nothing to check without a template


def test_load_tokenizer_applies_eos_override(tmp_path):
    from dpo_engine.modeling import load_tokenizer
    t = tiny_tokenizer()
    t.eos_token = "<pad>"  # like a base model: EOS is not the template's end of turn
    t.save_pretrained(tmp_path / "tok")
    tok = load_tokenizer(ModelConfig(eos_token="<|im_end|>"), str(tmp_path / "tok"))
    assert tok.eos_token == "<|im_end|>"
    (tmp_path / "plain.jinja").write_text("{% for m in messages %}{{ m.content }}\n{% endfor %}")
    with pytest.raises(ConfigError, match="model.eos_token"):
        load_tokenizer(ModelConfig(eos_token="<|im_end|>", chat_template_path=str(tmp_path / "plain.jinja")),
                       str(tmp_path / "tok"))


# ------------------------------------------------------------------------------------- streaming

def test_seen_ids():
    import numpy as np
    s = SeenIds()
    s.add(np.array([5, 2**64 - 1, 3], dtype=np.uint64), np.array([0, 1, 2]))
    s.add(np.array([4], dtype=np.uint64), np.array([9]))
    got = s.lookup(np.array([3, 4, 7, 2**64 - 1], dtype=np.uint64))
    assert got.tolist() == [2, 9, -1, 1] and len(s) == 4


def test_iter_batches_streams_files(tmp_path):
    import pandas as pd
    rows = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(25)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "b.json").write_text("".join(json.dumps(r) + "\n" for r in rows))  # JSON lines, .json
    pd.DataFrame(rows).to_parquet(tmp_path / "c.parquet", row_group_size=7)
    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    for name in ("a.jsonl", "b.json", "c.parquet", "d.csv"):
        batches = list(sources.iter_batches(tmp_path / name, batch_rows=10))
        assert max(map(len, batches)) <= 10 and len(batches) >= 3, name
        assert [r for b in batches for r in b] == rows, name


def test_validate_streams_50k_rows(tok, tmp_path, monkeypatch):
    n, batch = 50_000, 2048
    src = tmp_path / "big.jsonl"
    with open(src, "w") as f:
        for i in range(n):
            f.write(json.dumps({"prompt": f"q{i}", "chosen": " y", "rejected": " n"}) + "\n")
        f.write("{broken\n")
    seen_batches, encoded = [], []
    real_iter, real_encode = split_mod.iter_batches, encode_mod.encode_batch

    def spy_iter(source, batch_rows):
        for rows in real_iter(source, batch_rows):
            seen_batches.append(len(rows))
            yield rows

    def spy_encode(examples, *a, **kw):
        encoded.append(len(examples))
        return real_encode(examples, *a, **kw)

    def no_load(*a, **kw):
        raise AssertionError("validate_split must not load a file source whole")
    monkeypatch.setattr(split_mod, "iter_batches", spy_iter)
    monkeypatch.setattr(encode_mod, "encode_batch", spy_encode)
    monkeypatch.setattr(holdout_mod, "load_rows", no_load)
    monkeypatch.setattr(sources, "load_rows", no_load)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rep = validate_split(src, tmp_path / "out", tok, CFG, batch_rows=batch, limit=30_000)
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    assert (rep["rows_in"], rep["valid"], rep["rejected"], rep["limited_out"]) == (n + 1, 30_000, 1, 20_000)
    assert max(seen_batches) == batch and sum(seen_batches) == n + 1
    assert len(encoded) == len(seen_batches) and max(encoded) <= batch  # one tokenizer call per batch
    pf = pq.ParquetFile(tmp_path / "out" / "valid.parquet")
    assert pf.metadata.num_rows == 30_000 and pf.num_row_groups > 1  # written batch by batch
    idx = pq.read_table(tmp_path / "out" / "valid.parquet", columns=["source_index"])["source_index"]
    assert idx.to_pylist() == sorted(idx.to_pylist())
    assert not [p for p in (tmp_path / "out").iterdir() if ".tmp" in p.name]  # temporary files: .<name>.tmp<pid>
    assert grown_mb < 150, f"peak RSS grew {grown_mb:.0f} MiB"


def test_limit_independent_of_batching_and_order(tok, tmp_path):
    rows = [{"prompt": f"q{i}", "chosen": " y", "rejected": " n"} for i in range(3000)]
    reps = [validate_split(r, tmp_path / f"o{k}", tok, CFG, batch_rows=b, limit=500)
            for k, (r, b) in enumerate([(rows, 100), (rows, 4096), (rows[::-1], 333)])]
    picked = [sorted(pq.read_table(tmp_path / f"o{k}" / "valid.parquet")["example_id"].to_pylist())
              for k in range(3)]
    assert picked[0] == picked[1] == picked[2] and len(picked[0]) == 500
    assert reps[0]["fingerprint"] == reps[1]["fingerprint"]
    other = validate_split(rows, tmp_path / "o3", tok, CFG.model_copy(update={"shuffle_seed": 1}), limit=500)
    assert other["fingerprint"] != reps[0]["fingerprint"]


def test_policy_fail_leaves_no_files(tok, tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}] * 3 + [{"prompt": "a"}]
    with pytest.raises(Exception, match="row 3 .*MISSING_FIELD"):
        validate_split(rows, tmp_path / "o", tok, CFG.model_copy(update={"invalid_policy": "fail"}),
                       batch_rows=2)
    assert list((tmp_path / "o").iterdir()) == []


def test_duplicates_across_batches_and_of_rejected_rows(tok, tmp_path):
    good, bad = {"prompt": "a", "chosen": " b", "rejected": " c"}, {"prompt": "a" * 5000, "chosen": "b",
                                                                   "rejected": "c"}
    rows = [good, bad, good, bad, good]
    _, valid, rejects = run(rows, tok, tmp_path, batch_rows=2)
    assert [v["source_index"] for v in valid] == [0]
    assert [(r["source_index"], r["code"]) for r in rejects] == [
        (1, "PROMPT_TOO_LONG"), (2, "DUPLICATE_ROW"), (3, "PROMPT_TOO_LONG"), (4, "DUPLICATE_ROW")]
    assert rejects[1]["message"] == "same pair as row 0"


# ------------------------------------------------------------------------------------- properties

from hypothesis import HealthCheck, given, settings, strategies as st  # noqa: E402

from data_contracts.layouts import Layout, RowError, to_example  # noqa: E402

PROPS = settings(derandomize=True, max_examples=60, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
words = st.text(alphabet="abcdefgh XYZ?!.,\n", min_size=1, max_size=12)


@st.composite
def explicit_standard(draw):
    prompt = draw(words.filter(lambda s: s.strip() and not s.endswith(" ")))
    c0, r0 = draw(st.sampled_from("abcxyz")), draw(st.sampled_from("ABCXYZ"))  # differ at once
    return {"prompt": prompt, "chosen": c0 + draw(words), "rejected": r0 + draw(words)}


@st.composite
def explicit_conversational(draw):
    prompt = []
    if draw(st.booleans()):
        prompt.append(msg("system", draw(words.filter(str.strip))))
    for _ in range(draw(st.integers(0, 2))):
        prompt += [msg("user", draw(words.filter(str.strip))), msg("assistant", draw(words.filter(str.strip)))]
    prompt.append(msg("user", draw(words.filter(str.strip))))
    chosen = draw(words.filter(str.strip))
    rejected = draw(words.filter(lambda s: s.strip() and s != chosen))
    return {"prompt": prompt, "chosen": [msg("assistant", chosen)], "rejected": [msg("assistant", rejected)]}


@PROPS
@given(st.one_of(explicit_standard(), explicit_conversational()))
def test_implicit_round_trip(row):
    conv = isinstance(row["prompt"], list)
    explicit = to_example(row, Layout("preference", conv, True))
    implicit = {"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]}
    back = to_example(implicit, Layout("preference", conv, False))
    assert (back.prompt, back.chosen, back.rejected) == (explicit.prompt, explicit.chosen, explicit.rejected)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
BASES = [
    {"prompt": "Hi", "chosen": " yes", "rejected": " no"},
    {"prompt": [msg("user", "Hi")], "chosen": [msg("assistant", "yes")], "rejected": [msg("assistant", "no")],
     "tools": [WEATHER]},
    OPENAI_ROW,
    {"conversations": [{"from": "human", "value": "Hi"}], "chosen": {"from": "gpt", "value": "a"},
     "rejected": {"from": "gpt", "value": "b"}, "system": "s", "tools": json.dumps([WEATHER])},
    {"chosen": "\n\nHuman: Hi\n\nAssistant: yes", "rejected": "\n\nHuman: Hi\n\nAssistant: no"},
]


def _mangle(data, node, depth=0):
    """Randomly replace, delete or keep values anywhere inside a JSON-like row."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            op = data.draw(st.sampled_from(["keep", "keep", "drop", "replace", "recurse"]))
            if op == "keep":
                out[k] = v
            elif op == "replace":
                out[k] = data.draw(json_values)
            elif op == "recurse":
                out[k] = _mangle(data, v, depth + 1)
        return out
    if isinstance(node, list):
        return [_mangle(data, v, depth + 1) for v in node if data.draw(st.integers(0, 4))]
    return data.draw(json_values) if data.draw(st.booleans()) else node


@PROPS
@given(st.data())
def test_mangled_rows_give_a_code_never_an_exception(tok, tmp_path, data):
    rows = [_mangle(data, BASES[data.draw(st.integers(0, len(BASES) - 1))]) for _ in range(6)]
    rows.append(data.draw(json_values))
    for row in rows:
        for name in ("preference", "openai", "sharegpt", "hh"):
            for conv in (False, True):
                try:
                    to_example(row, Layout(name, conv, data.draw(st.booleans())))
                except RowError as e:
                    assert e.code.isupper() and e.field
    out = tmp_path / f"m{data.draw(st.integers(0, 10**9))}"
    rep = validate_split(rows, out, tok, CFG, batch_rows=3)
    assert rep["rows_in"] == len(rows)
    assert rep["rows_in"] == rep["valid"] + rep["rejected"] + rep["duplicates"] + rep["limited_out"]
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert "MALFORMED" not in {r["code"] for r in rejects}, rejects
