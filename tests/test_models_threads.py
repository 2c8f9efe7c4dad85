"""Model loads from parallel threads (the variants of a parallel sweep) stay correct.

transformers' from_pretrained swaps process-wide globals while it runs; unserialised, two loads at
once can leave ``PreTrainedModel.tie_weights`` disabled for good and a tied lm_head on the meta device
(seen in CI: "Cannot copy out of meta tensor" in a parallel sweep's evaluation)."""

import threading

from transformers import PreTrainedModel

from data_contracts.config import ModelConfig
from dpo_engine.modeling import load_model
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


def test_adapter_initialisation_depends_on_the_seed_only(tmp_path):
    import torch
    from data_contracts.config import PeftConfig
    from dpo_engine.modeling import apply_adapter

    folder = str(tiny_model_dir(tmp_path / "m"))
    cfg = PeftConfig(enabled=True, r=4, target_modules=["q_proj", "v_proj"])

    def lora(global_seed, seed):
        torch.manual_seed(global_seed)  # whatever earlier stages or other threads drew
        model = apply_adapter(load_model(ModelConfig(), folder, "cpu"), cfg, seed=seed)
        return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_A" in n])

    assert torch.equal(lora(1, 5), lora(2, 5))
    assert not torch.equal(lora(1, 5), lora(1, 6))


def test_sampled_generations_do_not_depend_on_other_threads(tmp_path):
    import torch
    from data_contracts.config import EvalConfig
    from dpo_engine.evaluation import generate
    from dpo_engine.modeling import set_seed
    from tiny import tiny_tokenizer

    model = load_model(ModelConfig(), str(tiny_model_dir(tmp_path / "m")), "cpu")
    tok = tiny_tokenizer()
    prompts = [tok("Once upon")["input_ids"], tok("a time")["input_ids"]] * 4
    cfg = EvalConfig(do_sample=True, temperature=1.0, max_new_tokens=24, batch_size=2, seed=3)
    alone = generate(model, tok, prompts, cfg)
    done = threading.Event()

    def reseed():  # another variant's trainer seeding the global RNG (training itself draws nothing)
        while not done.is_set():
            set_seed(0)

    other = threading.Thread(target=reseed)
    other.start()
    try:
        together = [generate(model, tok, prompts, cfg) for _ in range(3)]
    finally:
        done.set()
        other.join()
    assert all(t == alone for t in together)
