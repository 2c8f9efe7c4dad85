"""A vision-language model's Hugging Face folder logged to MLflow as a pyfunc that generates from an
image and a prompt (:mod:`dpo_engine.tracking.vision_pyfunc`, logged from code), the folder
(weights, config, processor with its image processor, tokenizer and chat template) as its
``hf_model`` artifact (stored as ``artifacts/model/``). MLflow's transformers flavor does not serve models saved with a processor
through pyfunc, hence this flavor of our own."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pandas as pd
from mlflow.models import Model, infer_signature

from dpo_engine.tracking import client as tracking_client  # mlflow_client read per call: tests patch it

PYFUNC_FILE = Path(__file__).with_name("vision_pyfunc.py")
ARTIFACT = "hf_model"  # the folder's artifact key (MLflow copies it to ``artifacts/<folder name>/``)


def log_vision_model(run_id: str, model_dir: Path, pip_requirements: list[str]) -> tuple[str, str]:
    """Log ``model_dir`` (a vision-language model folder with its processor) to the run; returns
    (model_uri, model_id)."""
    client = tracking_client.mlflow_client()
    run = client.get_run(run_id)
    logged = client.create_logged_model(run.info.experiment_id, name="model", source_run_id=run_id)
    example = pd.DataFrame({"prompt": ["What is in the image?"], "image": ["<local path or base64 of an image>"]})
    signature = infer_signature(example, ["text"], params={"max_new_tokens": 64, "do_sample": False,
                                                           "temperature": 1.0, "top_p": 1.0})
    info = Model.log(artifact_path=None, flavor=mlflow.pyfunc, name="model", run_id=run_id,
                     model_id=logged.model_id, python_model=str(PYFUNC_FILE),
                     artifacts={ARTIFACT: str(model_dir)}, signature=signature,
                     pip_requirements=pip_requirements + ["pillow"], tags={"run_id": run_id})
    return info.model_uri, info.model_id
