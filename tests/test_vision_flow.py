"""`dpo run --config configs/vision-tiny.yaml` on tiny vision-language models of two architectures:
validate -> precompute -> train -> evaluate -> register, then the registered version generates from an
image and a prompt through MLflow."""

import base64
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from safetensors.torch import load_file

from tiny_vlm import color_rows, tiny_vlm_dir, write_jsonl

ROOT = Path(__file__).resolve().parents[1]


def _sets(model_dir: Path, data: Path, name: str, **extra) -> list[str]:
    values = {"model.name_or_path": model_dir, "data.source": data / "train.jsonl",
              "data.eval_source": data / "eval.jsonl", "train.num_train_epochs": 1, "train.save_steps": 1,
              "train.per_device_train_batch_size": 4, "eval.num_prompts": 4, "eval.max_new_tokens": 4,
              "registry.model_name": name, "registry.gate.thresholds": "{}", **extra}
    return [a for k, v in values.items() for a in ("--set", f"{k}={v}")]


def _run(argv: list[str], capsys) -> dict:
    from flows.cli import main

    assert main(["run", "--config", str(ROOT / "configs" / "vision-tiny.yaml"), *argv]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    return json.loads(Path(out.split("summary:")[1].split()[0]).read_text())


@pytest.mark.parametrize("arch", ["llava", "idefics3"])
def test_dpo_run_vision_five_stages_and_registered_generation(dpo_home, tmp_path, capsys, arch):
    import mlflow

    from data_contracts.state import mlflow_uri
    from dpo_engine import tracking

    model_dir = tiny_vlm_dir(tmp_path / arch, arch)
    data = tmp_path / "data"
    write_jsonl(data / "train.jsonl", color_rows(data, 12, seed=0))
    write_jsonl(data / "eval.jsonl", color_rows(data, 4, seed=1))
    summary = _run(_sets(model_dir, data, f"vision-{arch}"), capsys)
    assert [s["status"] for s in summary["stages"].values()] == ["completed"] * 5
    run_dir = Path(summary["run_dir"])

    valid = pd.read_parquet(run_dir / "validate" / "train" / "valid.parquet")
    assert len(valid) == 12 and valid["images"].notna().all()
    pre = json.loads((run_dir / "precompute.json").read_text())
    assert pre["computed_examples"] == 16

    trained = run_dir / "train" / "model"
    assert (trained / "processor_config.json").is_file() and (trained / "chat_template.jinja").is_file()
    before, after = load_file(model_dir / "model.safetensors"), load_file(trained / "model.safetensors")
    tower = [k for k in before if "vision_tower" in k or "vision_model" in k]
    assert tower and all(torch.equal(before[k], after[k]) for k in tower)  # model.freeze_vision
    assert any(not torch.equal(before[k], after[k]) for k in before if k not in tower)
    samples = (run_dir / "evaluate" / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 4 and "eval/kl_policy_reference" in json.loads(
        (run_dir / "evaluate" / "metrics.json").read_text())

    tracking.connect(mlflow_uri())
    uri = f"models:/vision-{arch}/{summary['registered_version']}"
    served = mlflow.pyfunc.load_model(uri)
    image = data / "images" / "1-0.png"
    out = served.predict(pd.DataFrame({"prompt": ["What color is the square?"] * 2,
                                       "image": [str(image), base64.b64encode(image.read_bytes()).decode()]}),
                         params={"max_new_tokens": 3})
    assert len(out) == 2 and all(isinstance(x, str) for x in out) and out[0] == out[1]
    model, processor = tracking.load_registered(uri)
    assert type(model).__name__.endswith("ForConditionalGeneration") and hasattr(processor, "image_processor")

    if arch == "llava":  # a second run that changes only training reuses the validated data and reference cache
        again = _run(_sets(model_dir, data, f"vision-{arch}", **{"train.learning_rate": 1e-3}), capsys)
        st = {k: v["status"] for k, v in again["stages"].items()}
        assert st["validate"] == st["precompute"] == "reused" and st["train"] == "completed"
