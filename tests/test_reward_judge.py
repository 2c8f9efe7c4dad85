"""A reward model (AutoModelForSequenceClassification folder) as the evaluation judge."""

import pytest
import torch

from dpo_engine.evaluation import EvaluationError, judge_table, load_judge
from tiny import tiny_tokenizer


@pytest.fixture
def reward_dir(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    tok = tiny_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, num_labels=1,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    model = LlamaForSequenceClassification(cfg)
    model.save_pretrained(tmp_path / "rm", safe_serialization=True)
    tok.save_pretrained(tmp_path / "rm")
    return tmp_path / "rm", model, tok


def test_reward_model_judge_scores_with_the_model(reward_dir):
    path, model, tok = reward_dir
    judge = load_judge(f"reward_model:{path}")
    prompt = [{"role": "user", "content": "Say hi"}]
    got = judge(prompt, "Hi!", {})
    text = tok.apply_chat_template(prompt + [{"role": "assistant", "content": "Hi!"}], tokenize=False)
    with torch.no_grad():
        want = model(**tok(text, return_tensors="pt")).logits[0, 0].item()
    assert abs(got - want) < 1e-5
    rows = [{"example_id": "a", "prompt": '[{"role": "user", "content": "Say hi"}]', "meta": "{}"}]
    table, metrics = judge_table(rows, ["Hi!"], ["Go away."], judge)
    assert metrics["eval/win_rate"] in (0.0, 0.5, 1.0)
    assert table.loc[0, "policy_score"] == pytest.approx(want, abs=1e-5)


def test_reward_model_judge_errors(tmp_path):
    with pytest.raises(EvaluationError, match="not found"):
        load_judge(f"reward_model:{tmp_path}/missing")
    with pytest.raises(EvaluationError, match="needs a folder"):
        load_judge("reward_model:")
