"""Training checkpoints: written atomically, verified before a resume, read in full before applied.

A checkpoint is a folder ``step-N/`` holding the trained weights (safetensors: the policy, or its
adapter), the synced reference with TR-DPO (``reference/model.safetensors``), ``trainer.pt`` (optimizer,
scheduler, master weights, loss scale and every rank's RNG states; read with ``weights_only=True``)
and ``state.json``, written last, with the step, where its metric history ends in the folder's
``history.jsonl`` (entries, bytes, sha256: :mod:`~dpo_engine.training.history_log`), the best
checkpoint so far (``best``, :mod:`~dpo_engine.training.best`), every other file's size and sha256 and
a digest of itself. It is written as ``.step-N.tmp<pid>`` and renamed (``atomic_write``),
so a killed save leaves no ``step-N``; leftovers of dead writers are removed.

A resume takes the newest checkpoint whose files match their recorded sizes and hashes (older ones
without the record get structural checks), reading every file before applying any; a damaged one is
named (``checkpoint skipped: step-N/<file> is damaged (...)``) and the next older one is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_model
from torch import nn

from data_contracts.helpers import atomic_write, pid_alive, sha256_file
from dpo_engine.modeling import is_peft
from dpo_engine.training.distributed import world
from dpo_engine.training.errors import TrainingError
from dpo_engine.training.history_log import HISTORY, read_history, sync_history
from dpo_engine.training.master_weights import MasterWeights

REF_WEIGHTS = "reference/model.safetensors"  # TR-DPO: the synced reference, next to the policy
STATE = "state.json"
_STEP_DIR = re.compile(r"step-\d+")


class DamagedCheckpoint(Exception):
    """A checkpoint file that exists but cannot be used (``name``: ``step-N/file``). ``touched``:
    the model's weights were already loaded from that checkpoint (an older one's load overwrites them)."""

    def __init__(self, name: str, reason: str, touched: bool = False):
        super().__init__(f"{name} is damaged ({reason})")
        self.name, self.reason, self.touched = name, reason, touched


def _why(e: BaseException) -> str:
    """A short reason: the error's type and first sentence (torch's come with paragraphs of advice)."""
    text = str(e).strip()
    first = text.splitlines()[0].split(". ")[0].rstrip(".") if text else ""
    return f"{type(e).__name__}: {first}"[:160] if first else type(e).__name__


def _hash_files(folder: Path, names: list[str]) -> dict[str, str]:
    """sha256 of each file, in threads (hashlib releases the GIL): weights and trainer.pt at once."""
    if len(names) < 2:
        return {n: sha256_file(folder / n) for n in names}
    with ThreadPoolExecutor(max(1, min(len(names), os.cpu_count() or 1, 8))) as ex:
        return dict(zip(names, ex.map(lambda n: sha256_file(folder / n), names)))


def _file_manifest(folder: Path) -> dict[str, dict]:
    """Size and sha256 of every file of a checkpoint being written (but state.json), hashed right
    after writing (from the page cache), so that a resume tells a damaged file from an intact one,
    bit flips inside tensor data included (safetensors and torch's zip reader do not see those)."""
    names = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())
    names = [n for n in names if n != STATE]
    hashes = _hash_files(folder, names)
    return {n: {"size": (folder / n).stat().st_size, "sha256": hashes[n]} for n in names}


def _state_digest(state: dict) -> str:
    body = {k: v for k, v in state.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _read_state(path: Path) -> dict:
    """A checkpoint's state.json: step, history and (since the manifest) ``files``, sizes and hashes."""
    name = f"{path.name}/{STATE}"
    try:
        state = json.loads((path / STATE).read_text())
    except ValueError as e:  # invalid JSON or UTF-8
        raise DamagedCheckpoint(name, f"invalid JSON: {_why(e).partition(': ')[2]}") from None
    if not isinstance(state, dict) or not isinstance(state.get("step"), int) \
            or not (isinstance(state.get("history"), list) or isinstance(state.get("history_len"), int)):
        raise DamagedCheckpoint(name, "no step and history in it")
    if "digest" in state and state["digest"] != _state_digest(state):
        raise DamagedCheckpoint(name, "its content differs from the digest recorded at save")
    if "history" not in state:  # the history lives in the folder's history.jsonl (a prefix of it)
        state["history"] = read_history(path.parent, state["history_len"], state.get("history_bytes", -1),
                                        str(state.get("history_sha256")))
        if state["history"] is None:
            raise DamagedCheckpoint(name, f"the first {state['history_len']} entries of {HISTORY} it "
                                          "names are missing or changed")
    files = state.get("files")
    if files is not None and not (isinstance(files, dict) and all(
            isinstance(e, dict) and isinstance(e.get("size"), int) and isinstance(e.get("sha256"), str)
            for e in files.values())):
        raise DamagedCheckpoint(name, "its file list is malformed")
    return state


def _manifest_problem(path: Path, files: dict[str, dict]) -> str | None:
    for rel, entry in files.items():  # sizes first: a truncated file is told without reading anything
        f = path / rel
        if not f.is_file():
            return f"{path.name}/{rel} is missing"
        if f.stat().st_size != entry["size"]:
            return f"{path.name}/{rel} is damaged ({f.stat().st_size} bytes, {entry['size']} were written)"
    hashes = _hash_files(path, list(files))
    for rel, entry in files.items():
        if hashes[rel] != entry["sha256"]:
            return f"{path.name}/{rel} is damaged (its sha256 differs from the one recorded at save)"
    return None


def _structure_problem(path: Path) -> str | None:
    """A checkpoint written before the manifest: every safetensors header and trainer.pt's zip
    directory and pickle are read (not the tensor data, which only the manifest's hashes cover)."""
    files = sorted(path.glob("*.safetensors")) + [f for f in [path / REF_WEIGHTS] if f.is_file()]
    for f in files:
        try:
            with safe_open(str(f), framework="pt") as fh:
                fh.keys()
        except Exception as e:  # SafetensorError: a header that does not parse or cover the file
            return f"{path.name}/{f.relative_to(path).as_posix()} is damaged ({_why(e)})"
    try:
        _read_blob(path, mmap=True)
    except DamagedCheckpoint as e:
        return str(e)
    return None


def _checkpoint_problem(path: Path, with_reference: bool = False) -> str | None:
    """What is wrong with a checkpoint folder: a missing file (state.json, trainer.pt, weights, the
    synced reference's weights with TR-DPO) or a damaged one (a state.json that
    does not parse; a file whose size or sha256 differs from state.json's manifest; for a checkpoint
    written without one, a safetensors header or trainer.pt that does not read). None: usable."""
    for name in (STATE, "trainer.pt") + ((REF_WEIGHTS,) if with_reference else ()):
        if not (path / name).is_file():
            return f"{path.name}/{name} is missing"
    if not any(path.glob("*.safetensors")):
        return f"{path.name}/model.safetensors is missing"
    try:
        files = _read_state(path).get("files")
    except DamagedCheckpoint as e:
        return str(e)
    return _structure_problem(path) if files is None else _manifest_problem(path, files)


def checkpoint_dirs(ckpt_dir: Path) -> list[Path]:
    """``step-N`` folders, newest first."""
    found = [p for p in ckpt_dir.glob("step-*") if _STEP_DIR.fullmatch(p.name) and p.is_dir()]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]), reverse=True)


def _intact_checkpoints(ckpt_dir: Path, log: Callable[[str], None] = print, with_reference: bool = False):
    """The checkpoints that pass ``_checkpoint_problem``, newest first, checked one at a time as they
    are asked for; the others are reported by name and skipped."""
    for p in checkpoint_dirs(ckpt_dir):
        problem = _checkpoint_problem(p, with_reference)
        if problem is None:
            yield p
        else:
            log(f"checkpoint skipped: {problem}")


def latest_checkpoint(ckpt_dir: Path, log: Callable[[str], None] = print,
                       with_reference: bool = False) -> Path | None:
    """The newest intact checkpoint; incomplete or damaged ones are reported by name and skipped."""
    return next(_intact_checkpoints(ckpt_dir, log, with_reference), None)


def resume(ckpt_dir: Path, read: Callable[[Path], object], log: Callable[[str], None] = print,
            with_reference: bool = False) -> tuple[Path | None, object]:
    """(checkpoint, ``read(checkpoint)``) for the newest checkpoint that passes its checks and reads
    back (``read`` raises DamagedCheckpoint otherwise: the next older one is tried), or (None, None):
    training starts from step 0, said so when checkpoints were there. Every rank reads the same files,
    so every rank lands on the same one (``train`` checks it)."""
    touched = None
    for p in _intact_checkpoints(ckpt_dir, log, with_reference):
        try:
            return p, read(p)
        except DamagedCheckpoint as e:
            log(f"checkpoint skipped: {e}")
            touched = touched or (e if e.touched else None)
    if touched is not None:  # the weights hold part of a damaged checkpoint: no clean start from here
        raise TrainingError(f"checkpoint {ckpt_dir / touched.name} is damaged ({touched.reason}), found after "
                            f"its weights were loaded, and no older intact checkpoint is left; delete "
                            f"{ckpt_dir} and re-run to start from step 0")
    if checkpoint_dirs(ckpt_dir):
        log(f"no intact checkpoint left in {ckpt_dir}: training starts from step 0")
    return None, None


def rng_state() -> dict:
    """This process's random generators (torch CPU and CUDA, Python, NumPy) in a form that
    ``torch.load(weights_only=True)`` reads back: dropout (e.g. LoRA's) draws from them, so a resumed
    run continues their streams where the checkpoint left them."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": (kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(gauss))}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def remove_crash_leftovers(ckpt_dir: Path, log: Callable[[str], None] = print) -> None:
    """Delete ``.step-N.tmp<pid>`` folders that a killed save left behind (their writer is gone)."""
    for tmp in ckpt_dir.glob(".step-*.tmp*"):
        pid = tmp.name.rpartition(".tmp")[2]
        if pid.isdigit() and int(pid) != os.getpid() and pid_alive(int(pid)):
            continue
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"removed an unfinished checkpoint write: {tmp.name}")


def save_checkpoint(ckpt_dir: Path, step: int, model, opt, sched, history: list[dict],
                    ref_model: nn.Module | None = None, full_state: tuple[dict, dict] | None = None,
                    master: MasterWeights | None = None, scaler: torch.amp.GradScaler | None = None,
                    rng: list[dict] | None = None, best: dict | None = None) -> None:
    """``full_state``: (model, optimizer) state dicts gathered from FSDP shards, written instead of
    ``model``'s and ``opt``'s own (same files; the optimizer's keyed by parameter name). ``master``:
    fp32 master copies of 16-bit weights, ``scaler``: the fp16 loss scale, and ``rng``: every rank's
    random generator states (``rng_state``, in rank order), kept in trainer.pt; ``best``: the best
    checkpoint so far (:mod:`~dpo_engine.training.best`), in state.json. state.json, written last,
    lists every other file's size and sha256 and carries a digest of itself."""
    final = ckpt_dir / f"step-{step}"

    def write(tmp: Path) -> None:
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True, **({"state_dict": full_state[0]} if full_state else {}))
        if ref_model is not None:  # TR-DPO changes the reference: a resumed run needs its weights too
            (tmp / REF_WEIGHTS).parent.mkdir()
            save_model(ref_model, str(tmp / REF_WEIGHTS))
        torch.save({"optimizer": full_state[1] if full_state else opt.state_dict(),
                    "scheduler": sched.state_dict(), "fsdp": full_state is not None,
                    "master": master.state() if master else [],
                    "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else {},
                    "rng": rng or []},
                   tmp / "trainer.pt")
        state = {"step": step, **sync_history(ckpt_dir, history), "files": _file_manifest(tmp),
                 **({"best": best} if best else {})}
        state["digest"] = _state_digest(state)
        (tmp / STATE).write_text(json.dumps(state))

    atomic_write(final, write)


def _read_blob(path: Path, mmap: bool = False) -> dict:
    """trainer.pt (``mmap``: its pickle and zip directory only, tensor data left on disk)."""
    name = f"{path.name}/trainer.pt"
    try:
        with open(path / "trainer.pt", "rb") as fh:
            if fh.read(4) != b"PK\x03\x04":
                raise DamagedCheckpoint(name, "not a torch zip checkpoint")
        blob = torch.load(path / "trainer.pt", weights_only=True,
                          **({"mmap": True, "map_location": "cpu"} if mmap else {}))
    except (DamagedCheckpoint, MemoryError, torch.OutOfMemoryError):
        raise
    except Exception as e:  # truncated: the zip reader's OSError/RuntimeError; garbled: UnpicklingError...
        raise DamagedCheckpoint(name, _why(e)) from None
    if not isinstance(blob, dict) or not {"optimizer", "scheduler"} <= blob.keys():
        raise DamagedCheckpoint(name, "no optimizer and scheduler state in it")
    return blob


def read_checkpoint(path: Path, model, ref_model: nn.Module | None = None) -> tuple[dict, dict]:
    """A resume's first half: state.json, the weights into ``model`` (None: not loaded here) and
    ``ref_model`` (TR-DPO), then trainer.pt; returns (state, trainer blob). A file that does not read
    back raises DamagedCheckpoint naming it (``touched`` when weights were already loaded from this
    checkpoint). Optimizer, scheduler, master weights, loss scale and RNG are only set afterwards
    (``apply_trainer_state``), from a checkpoint read whole: a damaged one changes at most the weights,
    and the next (older) checkpoint's load overwrites all of them (every key is checked)."""
    state = _read_state(path)
    touched = False
    try:
        if model is not None:
            _load_weights(path, model)
            touched = True
        if ref_model is not None:
            _load_reference(path, ref_model)
            touched = True
        blob = _read_blob(path)
    except DamagedCheckpoint as e:
        e.touched = touched
        raise
    return state, blob


def apply_trainer_state(path: Path, blob: dict, opt, sched, fsdp_root: nn.Module | None = None,
                        master: MasterWeights | None = None, scaler: torch.amp.GradScaler | None = None) -> None:
    """A resume's second half: optimizer, scheduler, master weights, loss scale and RNG from trainer.pt
    (read by ``read_checkpoint``). ``fsdp_root``: the optimizer state is a gathered one, scattered to
    this rank's shards."""
    if bool(blob.get("fsdp")) != (fsdp_root is not None):
        raise TrainingError(f"checkpoint {path} was written {'with' if blob.get('fsdp') else 'without'} FSDP; "
                            f"resume it the same way or delete {path.parent} to start over")
    if fsdp_root is None:
        opt.load_state_dict(blob["optimizer"])
    else:  # FSDP runs only: half a second of start-up otherwise
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        set_optimizer_state_dict(fsdp_root, opt, blob["optimizer"], options=StateDictOptions(full_state_dict=True))
    sched.load_state_dict(blob["scheduler"])
    if master is not None and master.active:  # a checkpoint without them: start from its weights
        master.load_state(blob["master"]) if blob.get("master") else master.from_model()
    if scaler is not None and scaler.is_enabled() and blob.get("scaler"):
        scaler.load_state_dict(blob["scaler"])
    rank, n_ranks = world()
    if len(blob.get("rng") or []) == n_ranks:  # another world size cannot continue the same streams
        set_rng_state(blob["rng"][rank])


def load_weights(path: Path, model) -> None:
    """Only the weights of checkpoint ``path`` into ``model`` (the best one at the end of a training),
    after its files are checked against their recorded sizes and hashes."""
    problem = _checkpoint_problem(path)
    if problem is None:
        try:
            return _load_weights(path, model)
        except DamagedCheckpoint as e:
            problem = str(e)
    raise TrainingError(f"checkpoint {path} cannot be loaded: {problem}; set train.load_best_model_at_end=false "
                        "to keep the last step's weights")


def _read_safetensors(path: Path, rel: str) -> dict[str, torch.Tensor]:
    try:
        return load_file(path / rel)
    except (SafetensorError, OSError) as e:
        raise DamagedCheckpoint(f"{path.name}/{rel}", _why(e)) from None


def _load_weights(path: Path, model) -> None:
    """The checkpoint's weights into ``model``, every file read before any is applied; all of the
    model's (or, for a PeftModel, its adapter's) weights must be in it, so that a load overwrites
    whatever an earlier one left."""
    state = {}
    for f in sorted(path.glob("*.safetensors")):
        state.update(_read_safetensors(path, f.name))
    if is_peft(model):  # an adapter checkpoint: adapter weights only
        from peft import get_peft_model_state_dict, set_peft_model_state_dict  # seconds to import: PEFT runs only
        missing = sorted(set(get_peft_model_state_dict(model)) - set(state))
        unexpected = list(set_peft_model_state_dict(model, state).unexpected_keys)
    else:
        missing, unexpected = _load_state(model, state)
    if unexpected or missing:
        raise TrainingError(f"checkpoint {path} does not match the model "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")


def _model_keys(model: nn.Module, state: dict) -> dict:
    """``state`` as saved by ``save_pretrained`` with the model's own parameter names: transformers
    writes some architectures under their original checkpoint names (a LLaVA's
    ``language_model.model.*`` for its ``model.language_model.*``); a key renamed on saving is
    renamed back (its tensor is the one of the model's own key)."""
    own = model.state_dict()
    if set(state) <= set(own):
        return state
    try:
        from transformers.core_model_loading import revert_weight_conversion
    except ImportError:
        return state
    by_ptr: dict[int, str] = {}
    for k, t in own.items():
        by_ptr.setdefault(t.data_ptr(), k)
    saved = revert_weight_conversion(model, dict(own))
    rename = {k: by_ptr[t.data_ptr()] for k, t in saved.items() if t.data_ptr() in by_ptr}
    return {rename.get(k, k): v for k, v in state.items()}


def _load_state(model: nn.Module, state: dict) -> tuple[list[str], list[str]]:
    """(missing, unexpected) keys; a missing key whose tensor is tied to a loaded one (a tied LM
    head, written once) is not missing."""
    state = _model_keys(model, state)
    missing, unexpected = model.load_state_dict(state, strict=False)
    own = model.state_dict()
    loaded = {own[k].data_ptr() for k in state if k in own}
    return [k for k in missing if "lm_head" not in k and own[k].data_ptr() not in loaded], list(unexpected)


def _load_reference(path: Path, ref_model: nn.Module) -> None:
    """TR-DPO's synced reference: every weight."""
    missing, unexpected = _load_state(ref_model, _read_safetensors(path, REF_WEIGHTS))
    if unexpected or missing:
        raise TrainingError(f"checkpoint {path / REF_WEIGHTS} does not match the reference model "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
