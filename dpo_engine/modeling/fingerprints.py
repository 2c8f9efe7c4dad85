"""Cheap content fingerprints of a model (its weight files' hashes) and of a tokenizer."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from data_contracts.helpers import file_sha256


def model_fingerprint(model_path: str, revision: str | None = None) -> str:
    """From the weight files' hashes and config.json (local), or id@revision (hub)."""
    p = Path(model_path)
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(p.iterdir()):
            if f.suffix == ".safetensors" or f.name == "config.json":
                h.update(f.name.encode())
                h.update(file_sha256(f).encode())
    else:
        h.update(f"{model_path}@{revision or 'main'}".encode())
    return h.hexdigest()[:16]


def tokenizer_fingerprint(tok) -> str:
    h = hashlib.sha256()
    backend = getattr(tok, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tok.get_vocab().items()))).encode())
    h.update(str(tok.chat_template).encode())
    h.update(json.dumps(tok.special_tokens_map, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
