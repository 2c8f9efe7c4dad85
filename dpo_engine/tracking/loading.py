"""A registered model version back on disk or in memory: one Hugging Face folder, or (model, tokenizer).

``download_hf_folder`` puts a version's ``model/`` and ``components/tokenizer/`` artifacts back
together as one Hugging Face folder (a base + adapter version as an adapter folder with its base);
``load_registered`` loads (model, tokenizer).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import mlflow
from mlflow.transformers.peft import _PEFT_ADAPTOR_DIR_NAME

from dpo_engine.modeling import LOAD_LOCK, is_vision_model
from dpo_engine.tracking.packaging import ADAPTER_CONFIG, ADAPTER_WEIGHTS


def _is_adapter_artifact(root: Path) -> bool:
    return (root / _PEFT_ADAPTOR_DIR_NAME / ADAPTER_CONFIG).is_file()


def _copy_full(root: Path, dst: Path) -> Path:
    """A downloaded full-model artifact as one Hugging Face folder: model/ + components/tokenizer/
    (a vision-language model's pyfunc: its artifacts/hf_model/ folder)."""
    dst.mkdir(parents=True, exist_ok=True)
    vision = [f.parent for f in (root / "artifacts").glob("*/config.json")]  # MLflow names it by the source
    for sub in (root / "model", root / "components" / "tokenizer", *vision):
        if sub.is_dir():
            shutil.copytree(sub, dst, dirs_exist_ok=True)
    return dst


def download_hf_folder(model_uri: str, dst: str | Path, merge: bool = False) -> Path:
    """Download a registered model and lay it out as one Hugging Face folder at ``dst``
    (config, safetensors weights, tokenizer files, chat_template.jinja).

    A base + adapter version becomes an adapter folder as the train stage writes one: ``dst`` holds
    adapter_config.json, adapter_model.safetensors and the tokenizer, ``dst/base/`` the base model
    (its tokenizer included), and adapter_config.json's ``base_model_name_or_path`` is that folder,
    so ``AutoModelForCausalLM.from_pretrained(dst)`` (peft installed) or
    ``PeftModel.from_pretrained`` load base + adapter. ``merge=True``: the adapter merged into the
    base weights instead, written as a plain model folder (for consumers that take no adapters)."""
    dst = Path(dst)
    with tempfile.TemporaryDirectory(dir=dst.parent if dst.parent.exists() else None) as tmp:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        if not _is_adapter_artifact(root):
            return _copy_full(root, dst)
        dst.mkdir(parents=True, exist_ok=True)
        tok_dir = root / "components" / "tokenizer"
        if merge:
            model, tokenizer = _load_adapter_artifact(root, merge=True)
            model.save_pretrained(dst, safe_serialization=True)
            tokenizer.save_pretrained(dst)
            return dst
        base = dst / "base"
        for sub in (root / "model", tok_dir):
            shutil.copytree(sub, base, dirs_exist_ok=True)
        for sub in (root / _PEFT_ADAPTOR_DIR_NAME, tok_dir):
            shutil.copytree(sub, dst, dirs_exist_ok=True)
    conf = json.loads((dst / ADAPTER_CONFIG).read_text())
    conf["base_model_name_or_path"] = str(base.resolve())
    conf.pop("revision", None)  # the base is that folder now
    (dst / ADAPTER_CONFIG).write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    return dst


def _load_adapter_artifact(root: Path, merge: bool = False):
    """(PeftModel, or the adapter merged into a plain model, tokenizer) from a downloaded
    base + adapter artifact (``model/``, ``peft/``, ``components/tokenizer/``)."""
    from peft import PeftModel  # lazy: optional dependency, slow to import
    from transformers import AutoModelForCausalLM, AutoTokenizer  # lazy: slow to import

    adapter = root / _PEFT_ADAPTOR_DIR_NAME
    if not (adapter / ADAPTER_WEIGHTS).is_file():
        raise FileNotFoundError(f"registered adapter has no {ADAPTER_WEIGHTS} (safetensors only)")
    with LOAD_LOCK:
        base = AutoModelForCausalLM.from_pretrained(root / "model", use_safetensors=True,
                                                    trust_remote_code=False)
        model = PeftModel.from_pretrained(base, str(adapter))
    tokenizer = AutoTokenizer.from_pretrained(root / "components" / "tokenizer", trust_remote_code=False)
    return (model.merge_and_unload() if merge else model), tokenizer


def load_registered(model_uri: str, merge: bool = False):
    """(model, tokenizer) from a ``models:/name/version`` or ``models:/name@alias`` URI. A base +
    adapter version loads as a ``peft.PeftModel`` (the base with its adapter applied), or with
    ``merge=True`` as a plain model with the adapter merged into its weights. A vision-language
    model loads as (model, processor).

    Weights only: the version's files are downloaded and read as data (config, safetensors weights,
    tokenizer/processor files; no remote code, no pickle), and nothing the artifact names as code
    (an MLmodel ``loader_module``, a pyfunc's ``python_model``, ``code/``) is imported or run. Loading
    it with ``mlflow.pyfunc.load_model`` instead runs whatever code the registry holds for it: use
    that only with a registry whose writers you trust."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=tmp))
        if _is_adapter_artifact(root):
            return _load_adapter_artifact(root, merge=merge)
        folder = _copy_full(root, Path(tmp) / "hf")
        if not any(folder.glob("*.safetensors")):
            raise FileNotFoundError(f"registered model {model_uri} has no safetensors weights (only "
                                    "safetensors are loaded)")
        vision = is_vision_model(str(folder))
        with LOAD_LOCK:
            model = (AutoModelForImageTextToText if vision else AutoModelForCausalLM).from_pretrained(
                folder, use_safetensors=True, trust_remote_code=False)
        tokenizer = (AutoProcessor if vision else AutoTokenizer).from_pretrained(folder, trust_remote_code=False)
    return model, tokenizer

