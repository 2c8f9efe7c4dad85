"""A Hugging Face folder (a full model, or a PEFT adapter with its base) as an MLflow model.

A full model is an MLflow ``transformers`` model: its artifacts hold ``model/`` (config.json,
generation_config.json, model.safetensors) and ``components/tokenizer/`` (tokenizer files and
chat_template.jinja). With a chat template it is a chat model: MLflow's chat task (``llm/v1/chat``),
served by ``mlflow.pyfunc`` through :mod:`~dpo_engine.tracking.chat_model` (carried in the version's
``code/``: strings or chat messages in, the template applied, the reply out); without one it stays
MLflow's ``text-generation`` pipeline (the prompt reaches the model as given). Versions say which in
their ``task`` and ``chat_template`` tags (:func:`task_tags`). A vision-language model is a pyfunc of
our own whose ``artifacts/hf_model/`` is its whole folder, processor included (``vision_model``).

A PEFT adapter export (``peft.export: adapter``) is logged as base + adapter in MLflow's own PEFT
layout: ``model/`` holds the base model's weights (read from the folder named by the adapter's
``base_model_name_or_path``), ``peft/`` the adapter (adapter_config.json,
adapter_model.safetensors) and the flavor's ``peft_adaptor`` key points at it, so
``mlflow.pyfunc.load_model`` and ``mlflow.transformers.load_model`` apply the adapter to the base.
The logged model is self-contained: the base folder is needed when logging, not when loading.
"""

from __future__ import annotations

import json
import shutil
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import mlflow
from mlflow import pyfunc
from mlflow.models import Model, infer_signature
from mlflow.transformers.flavor_config import FlavorKey
from mlflow.transformers.peft import _PEFT_ADAPTOR_DIR_NAME
from mlflow.utils.file_utils import get_total_file_size

from dpo_engine.modeling import LOAD_LOCK, is_vision_model
from dpo_engine.tracking import client as tracking_client  # mlflow_client read per call: tests patch it
from dpo_engine.tracking.vision_model import log_vision_model

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FULL, ADAPTER = "full", "adapter"  # version tag model_format
CHAT_TASK, TEXT_TASK = "llm/v1/chat", "text-generation"  # version tag task
CHAT_MODEL_FILE = Path(__file__).with_name("chat_model.py")  # the chat pyfunc, carried by each chat version
CHAT_LOADER, CHAT_CODE_DIR = "dpo_chat_model", "code"  # ... as code/dpo_chat_model.py


def _pip_requirements(adapter: bool = False) -> list[str]:
    """Pinned requirements of a logged model (the installed versions; peft for an adapter)."""
    reqs = []
    packages = ("transformers", "torch", "tokenizers", "safetensors", "accelerate")
    for pkg in packages + (("peft",) if adapter else ()):
        try:
            reqs.append(f"{pkg}=={version(pkg).split('+')[0]}")
        except PackageNotFoundError:
            if pkg != "accelerate":
                reqs.append(pkg)
    return reqs


def model_format(model_dir: str | Path) -> str:
    """``adapter`` for a PEFT adapter folder (adapter_config.json; safetensors weights required),
    ``full`` for a Hugging Face model folder (config.json); FileNotFoundError otherwise."""
    model_dir = Path(model_dir)
    if (model_dir / ADAPTER_CONFIG).is_file():
        if not (model_dir / ADAPTER_WEIGHTS).is_file():
            raise FileNotFoundError(f"{model_dir} is a PEFT adapter folder without {ADAPTER_WEIGHTS} "
                                    "(only safetensors adapter weights are registered)")
        return ADAPTER
    if (model_dir / "config.json").is_file():
        return FULL
    raise FileNotFoundError(f"{model_dir} is neither a Hugging Face model folder (no config.json) "
                            f"nor a PEFT adapter folder (no {ADAPTER_CONFIG})")


def adapter_base(adapter_dir: str | Path) -> tuple[str, str | None]:
    """(base model folder or hub id, revision) an adapter folder was trained on, from its
    adapter_config.json. A local base must exist (its weights are logged with the adapter)."""
    adapter_dir = Path(adapter_dir)
    conf = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    base = conf.get("base_model_name_or_path")
    if not base:
        raise ValueError(f"{adapter_dir / ADAPTER_CONFIG} names no base_model_name_or_path")
    path = Path(base).expanduser()
    if path.is_absolute() or base.startswith((".", "~")) or path.exists():
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"base model folder {base} of adapter {adapter_dir} not found (no "
                                    "config.json): the adapter is registered with its base's weights")
        return str(path.resolve()), None
    return base, conf.get("revision")


def adapter_tags(adapter_dir: Path) -> dict[str, str]:
    """Version tags describing an adapter folder: ``model_format``, its base and PEFT type."""
    conf = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    tags = {"model_format": ADAPTER, "adapter_base_model": conf.get("base_model_name_or_path"),
            "adapter_peft_type": conf.get("peft_type")}
    if conf.get("revision"):
        tags["adapter_base_revision"] = conf["revision"]
    return {k: str(v) for k, v in tags.items() if v is not None}


class _TransformersFlavor:
    """A flavor for ``Model.log``: ``mlflow.transformers.save_model`` of the plain (base) model, then

    - with ``adapter_dir``, the adapter added where MLflow keeps a PEFT model's (``peft/`` and the
      flavor key ``peft_adaptor``): MLflow's loaders build ``PeftModel.from_pretrained(base, peft/)``.
      Not ``mlflow.transformers.log_model(PeftModel)``: for a base that is a local folder (no hub
      id) it saves the base's state dict with the LoRA layers injected (``...q_proj.base_layer.weight``
      and ``lora_A``/``lora_B``), which loads back with those projections newly initialised; and
      with ``base_model_path`` it only references a folder that every machine loading it must have;
    - with ``chat``, MLflow's chat task (``llm/v1/chat``: the flavor's ``inference_task`` and the
      model's ``metadata.task``) served through :mod:`~dpo_engine.tracking.chat_model`, carried as
      ``code/dpo_chat_model.py`` and named the python_function flavor's loader: strings and chat
      messages in, the chat template applied, the reply out. Its signature is a params schema only
      (``max_new_tokens``, ``do_sample``, ``temperature``, ``top_p``): the inputs take several
      shapes (strings, conversations, chat requests), which MLflow's chat schema would refuse."""

    __name__ = "mlflow.transformers"  # the flavor named on a LoggedModel that Model.log creates

    def __init__(self, adapter_dir: Path | None = None, chat: bool = False):
        self.adapter_dir, self.chat = adapter_dir, chat

    def save_model(self, path, mlflow_model, signature=None, **kwargs):
        mlflow.transformers.save_model(path=path, mlflow_model=mlflow_model,
                                       signature=None if self.chat else signature, **kwargs)
        path = Path(path)
        if self.adapter_dir is not None:
            dest = path / _PEFT_ADAPTOR_DIR_NAME
            dest.mkdir()
            for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
                shutil.copy2(self.adapter_dir / name, dest / name)
            mlflow_model.flavors["transformers"][FlavorKey.PEFT] = _PEFT_ADAPTOR_DIR_NAME
        if self.chat:  # MLflow set its chat signature, which takes no plain strings: ours replaces it
            (path / CHAT_CODE_DIR).mkdir(exist_ok=True)
            shutil.copy2(CHAT_MODEL_FILE, path / CHAT_CODE_DIR / f"{CHAT_LOADER}.py")
            mlflow_model.flavors[pyfunc.FLAVOR_NAME].update({pyfunc.MAIN: CHAT_LOADER, pyfunc.CODE: CHAT_CODE_DIR})
            mlflow_model.signature = signature
        if size := get_total_file_size(str(path)):
            mlflow_model.model_size_bytes = size
        mlflow_model.save(str(path / "MLmodel"))
        if self.adapter_dir is not None:
            from peft import PeftModel  # optional dependency, and slow to import

            # the base's weights are saved: the adapter must apply to it (shape mismatches raise
            # here, before anything is uploaded; MLflow's own input-example check would only warn)
            with LOAD_LOCK:
                PeftModel.from_pretrained(kwargs["transformers_model"]["model"],
                                          str(path / _PEFT_ADAPTOR_DIR_NAME))


def _weights_source(model_dir: Path, base_model_revision: str | None) -> tuple[str, str | None]:
    """(folder or hub id, revision) holding the weights logged for ``model_dir``: the folder itself,
    or an adapter's base (a hub id at the revision it was trained on)."""
    if model_format(model_dir) != ADAPTER:
        return str(model_dir), None
    weights_dir, revision = adapter_base(model_dir)
    if not Path(weights_dir).is_dir():
        revision = revision or base_model_revision
    return weights_dir, revision


def _tokenizer(model_dir: Path, base_model_revision: str | None = None):
    """The trained folder's tokenizer (chat template included); an adapter folder without one: its
    base's."""
    from transformers import AutoTokenizer  # lazy: slow to import

    if (model_dir / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(model_dir, trust_remote_code=False)
    weights_dir, revision = _weights_source(model_dir, base_model_revision)
    return AutoTokenizer.from_pretrained(weights_dir, revision=revision, trust_remote_code=False)


def _task_tags(tokenizer) -> dict[str, str]:
    """``task`` as MLflow serves the model (``llm/v1/chat`` with a chat template, else
    ``text-generation``: the prompt reaches the model as given) and ``chat_template`` (true/false)."""
    chat = bool(getattr(tokenizer, "chat_template", None))
    return {"task": CHAT_TASK if chat else TEXT_TASK, "chat_template": str(chat).lower()}


def task_tags(model_dir: str | Path, base_model_revision: str | None = None) -> dict[str, str]:
    """The version tags saying how ``log_hf_model`` serves ``model_dir`` (see :func:`_task_tags`);
    none for a vision-language model (its own pyfunc)."""
    model_dir = Path(model_dir)
    if model_format(model_dir) != ADAPTER and is_vision_model(str(model_dir)):
        return {}
    return _task_tags(_tokenizer(model_dir, base_model_revision))


def log_hf_model(run_id: str, model_dir: Path, base_model_revision: str | None = None) -> tuple[str, str]:
    """Log ``model_dir`` to the run as an MLflow transformers model; returns (model_uri, model_id).
    With a chat template it is served as a chat model (MLflow's chat task, see
    :class:`_TransformersFlavor`), without one as MLflow's ``text-generation``. An adapter folder is
    logged with its base model; a vision-language model folder as a pyfunc that generates from an
    image and a prompt (:mod:`~dpo_engine.tracking.vision_model`)."""
    from transformers import AutoModelForCausalLM  # lazy: slow to import

    model_dir = Path(model_dir)
    adapter = model_format(model_dir) == ADAPTER
    if not adapter and is_vision_model(str(model_dir)):
        return log_vision_model(run_id, model_dir, _pip_requirements())
    weights_dir, revision = _weights_source(model_dir, base_model_revision)
    client = tracking_client.mlflow_client()
    run = client.get_run(run_id)
    with LOAD_LOCK:
        model = AutoModelForCausalLM.from_pretrained(weights_dir, revision=revision, use_safetensors=True,
                                                     trust_remote_code=False)
    tokenizer = _tokenizer(model_dir, base_model_revision)
    tags = _task_tags(tokenizer)
    chat = tags["task"] == CHAT_TASK
    # Create the LoggedModel in the run's experiment ourselves: left to MLflow it would land in the
    # default experiment (./mlruns) since there is no active run.
    logged = client.create_logged_model(run.info.experiment_id, name="model", source_run_id=run_id)
    params = {"max_new_tokens": 64, "do_sample": False, "temperature": 1.0, "top_p": 1.0}
    if chat:  # a chat request as MLflow's chat task (and OpenAI) spell it
        example = {"messages": [{"role": "user", "content": "What is 2 + 2?"}], "max_tokens": 16}
        signature = infer_signature(params=params)  # params only: see _TransformersFlavor
        extra = {}
    else:
        example = "Hello"
        signature = infer_signature(example, ["text"], params=params)
        extra = {"model_config": {"max_new_tokens": 64}}
    info = Model.log(artifact_path=None, flavor=_TransformersFlavor(model_dir if adapter else None, chat),
                     transformers_model={"model": model, "tokenizer": tokenizer}, name="model",
                     task=CHAT_TASK if chat else TEXT_TASK, run_id=run_id, model_id=logged.model_id,
                     pip_requirements=_pip_requirements(adapter), signature=signature, input_example=example,
                     tags={"run_id": run_id, **tags}, **extra)
    return info.model_uri, info.model_id
