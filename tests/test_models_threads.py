"""Model loads from parallel threads (the variants of a parallel sweep) stay correct.

transformers' from_pretrained swaps process-wide globals while it runs; unserialised, two loads at
once can leave ``PreTrainedModel.tie_weights`` disabled for good and a tied lm_head on the meta device
(seen in CI: "Cannot copy out of meta tensor" in a parallel sweep's evaluation)."""

import threading

from transformers import PreTrainedModel

from data_contracts.config import ModelConfig
from dpo_engine.models import load_model
from tiny import tiny_model_dir


def test_concurrent_loads_give_complete_tied_models(tmp_path):
    folder = str(tiny_model_dir(tmp_path / "m"))
    original_tie = PreTrainedModel.tie_weights
    errors, models = [], []
    start = threading.Barrier(6)

    def load():
        try:
            start.wait()
            for _ in range(5):
                models.append(load_model(ModelConfig(), folder, "cpu"))
        except Exception as e:  # collected: a thread's exception would otherwise be lost
            errors.append(repr(e))

    threads = [threading.Thread(target=load) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert PreTrainedModel.tie_weights is original_tie
    assert len(models) == 30
    for m in models:
        assert all(p.device.type == "cpu" for p in m.parameters())
        assert m.lm_head.weight.data_ptr() == m.model.embed_tokens.weight.data_ptr()
