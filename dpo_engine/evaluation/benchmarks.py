"""Benchmarks through EleutherAI's lm-evaluation-harness (the ``lm-eval`` package), on the trained
policy and on its reference: ``eval.benchmarks`` (:class:`data_contracts.config.benchmarks.BenchmarksConfig`).

Tasks are registered lm-eval names, local task YAML files, or folders of them (every task defined
under it). Relative paths in a local task's ``dataset_kwargs`` (``data_files``, ``data_dir``) and a
``dataset_path`` starting with ``./`` or ``../`` are read from the YAML's folder (lm-eval itself reads
them from the working directory, which still works: a path is only rebased when it exists there).
Nothing is downloaded when ``HF_HUB_OFFLINE`` is set: a task whose dataset is not local fails in one
line naming it. Results: ``bench/<task>/<metric>`` (policy), ``bench_ref/<task>/<metric>`` (reference),
``bench_delta/<task>/<metric>`` (policy - reference); a metric under a filter other than ``none`` is
``<metric>/<filter>``; standard errors are ``<metric>_stderr`` (no delta).
"""

from __future__ import annotations

import gc
import glob
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable

import yaml

from data_contracts.config import ConfigError
from data_contracts.config.benchmarks import LM_EVAL_PIP, BenchmarksConfig
from data_contracts.helpers import file_sha256, fingerprint
from data_contracts.state import local_state_env

FIELD = "eval.benchmarks.tasks"
_DATA_KEYS = ("data_files", "data_dir")  # dataset_kwargs entries that name local files
_MLFLOW_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-. ")


class BenchmarkError(ConfigError):
    """A benchmark that cannot run as configured (``eval.benchmarks``): one line naming the task."""


def require_lm_eval():
    """The ``lm_eval`` package, or a :class:`BenchmarkError` saying how to install it. Importing its
    top level is cheap (its evaluator and models load on use)."""
    try:
        import lm_eval
    except ImportError:
        raise BenchmarkError(f"config error: {FIELD}: benchmarks need the lm-eval package (EleutherAI's "
                             f"lm-evaluation-harness), which is not installed: {LM_EVAL_PIP}") from None
    return lm_eval


def is_path(spec: str) -> bool:
    """A task given as a file or folder (``x.yaml``, ``./tasks``, ``/abs``, ``a/b``), not a task name."""
    return spec.endswith((".yaml", ".yml")) or "/" in spec or os.sep in spec or spec.startswith((".", "~"))


def check_benchmarks(cfg: BenchmarksConfig) -> None:
    """Before any compute: lm-eval is installed, the local task files and folders exist."""
    if not cfg.tasks:
        return
    require_lm_eval()
    for spec in cfg.tasks:
        if is_path(spec) and not Path(spec).expanduser().exists():
            raise BenchmarkError(f"config error: {FIELD}: file not found: {spec}")
    for folder in cfg.include_path:
        if not Path(folder).expanduser().is_dir():
            raise BenchmarkError(f"config error: eval.benchmarks.include_path: folder not found: {folder}")


# Local task YAMLs: their data files, read from the YAML's folder.

class _TaskYamlLoader(yaml.SafeLoader):
    """Reads a task YAML without running it: ``!function utils.f`` becomes ``_Function("utils.f")``,
    any other tag None."""


class _Function(str):
    """A ``!function module.name`` of a task YAML: lm-eval imports ``module.py`` from the YAML's folder."""


_TaskYamlLoader.add_multi_constructor(
    "!", lambda loader, tag, node: _Function(loader.construct_scalar(node))
    if tag == "function" and isinstance(node, yaml.ScalarNode) else None)


def _rebase(value: Any, base: Path) -> Any:
    """``value`` (a path, a list of them, or a split -> path(s) mapping) with each relative path that
    exists under ``base`` (a glob matching there) made absolute; other values unchanged."""
    if isinstance(value, dict):
        return {k: _rebase(v, base) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_rebase(v, base) for v in value]
    if isinstance(value, str) and value and not Path(value).expanduser().is_absolute() and "://" not in value:
        there = base / value
        if there.exists() or glob.glob(glob.escape(str(base)) + "/" + value):
            return str(there)
    return value


def localize(cfg: dict, base: Path) -> dict:
    """A local task's config with its data paths read from ``base`` (its YAML's folder) and its dataset
    cache under the state home (unless ``HF_DATASETS_CACHE`` says where)."""
    cfg = dict(cfg)
    kwargs = dict(cfg.get("dataset_kwargs") or {})
    for key in _DATA_KEYS:
        if key in kwargs:
            kwargs[key] = _rebase(kwargs[key], base)
    if isinstance(cfg.get("dataset_path"), str) and cfg["dataset_path"].startswith(("./", "../")):
        cfg["dataset_path"] = _rebase(cfg["dataset_path"], base)
    kwargs.setdefault("cache_dir", os.environ.get("HF_DATASETS_CACHE") or local_state_env()["HF_DATASETS_CACHE"])
    cfg["dataset_kwargs"] = kwargs
    return cfg


def _yaml_files(path: Path, seen: set[Path]) -> list[Path]:
    """A task YAML, the YAMLs it includes and the local data files they name."""
    path = path.resolve()
    if path in seen or not path.is_file():
        return []
    seen.add(path)
    try:
        cfg = yaml.load(path.read_text(), Loader=_TaskYamlLoader) or {}  # noqa: S506 (a SafeLoader)
    except (yaml.YAMLError, UnicodeDecodeError):
        return [path]
    out = [path]
    if not isinstance(cfg, dict):
        return out
    includes = cfg.get("include") or []
    for inc in includes if isinstance(includes, list) else [includes]:
        out += _yaml_files(path.parent / str(inc), seen)
    data = localize(cfg, path.parent)
    named = [data["dataset_kwargs"].get(k) for k in _DATA_KEYS] + [data.get("dataset_path")]
    for v in _strings(named):
        for f in (sorted(glob.glob(v)) or [v]) if Path(v).is_absolute() else []:
            f = Path(f)
            out += sorted(p for p in f.rglob("*") if p.is_file()) if f.is_dir() else [f] if f.is_file() else []
    for fn in (v for v in _strings(cfg) if isinstance(v, _Function)):
        module = path.parent / (fn.rpartition(".")[0].replace(".", "/") + ".py")
        out += [module] if module.is_file() else []
    return out


def _strings(value: Any) -> list[str]:
    """Every string inside ``value`` (nested dicts and lists)."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, (list, tuple)):
        return [s for v in value for s in _strings(v)]
    return [value] if isinstance(value, str) else []


def local_tasks_fingerprint(cfg: BenchmarksConfig) -> str:
    """The content of every local task file the benchmarks read (task YAMLs, what they include, their
    local data files, everything under a task folder or an include_path folder): the evaluate stage's
    reuse key holds it, so an edited task or dataset is measured again. "" without local tasks."""
    files: list[Path] = []
    seen: set[Path] = set()
    for spec in [s for s in cfg.tasks if is_path(s)] + list(cfg.include_path):
        p = Path(spec).expanduser()
        if p.is_dir():
            for f in sorted(x for x in p.rglob("*") if x.is_file() and "__pycache__" not in x.parts):
                files += _yaml_files(f, seen) if f.suffix in (".yaml", ".yml") else [f]
        else:
            files += _yaml_files(p, seen)
    if not files:
        return ""
    unique = sorted({str(f.resolve()): f for f in files}.items())
    return fingerprint([(name, file_sha256(f)) for name, f in unique])


# Tasks: resolved to lm-eval Task/Group objects once, before any model runs.

def _task_manager(cfg: BenchmarksConfig):
    """A TaskManager over the include_path folders and the task folders given; lm-eval's own tasks
    are indexed (one to two minutes on 2 busy CPU cores) only when a task name is not found there."""
    from lm_eval.tasks import TaskManager

    folders = [str(Path(p).expanduser().resolve()) for p in
               [*cfg.include_path, *(s for s in cfg.tasks if is_path(s) and Path(s).expanduser().is_dir())]]
    tm = TaskManager(include_path=folders or None, include_defaults=False)
    if any(s not in tm.task_index for s in cfg.tasks if not is_path(s)):
        tm = TaskManager(include_path=folders or None, include_defaults=True)
    return tm


def _entries(spec: str, tm) -> list[tuple[str, str, Path | None, Any]]:
    """(name, what TaskManager.load takes for it, its YAML or None, its dataset) of each task or group
    that ``spec`` (a name, a task YAML, a folder) stands for."""
    if not is_path(spec):
        entry = tm.task_index.get(spec)
        if entry is None:
            raise BenchmarkError(f"config error: {FIELD}: unknown task {spec!r}: not an lm-eval task, group or "
                                 "tag, nor one in eval.benchmarks.include_path; give a task name or the path of "
                                 "a local task YAML")
        return [(spec, spec, entry.yaml_path and Path(entry.yaml_path), (entry.cfg or {}).get("dataset_path"))]
    p = Path(spec).expanduser().resolve()
    if p.is_dir():
        found = sorted((e for e in tm.task_index.values() if e.yaml_path and p in Path(e.yaml_path).parents
                        and e.kind.name in ("TASK", "PY_TASK")), key=lambda e: e.name)
        if not found:
            raise BenchmarkError(f"config error: {FIELD}: {spec}: no lm-eval task YAML in this folder")
        return [(e.name, e.name, Path(e.yaml_path), (e.cfg or {}).get("dataset_path")) for e in found]
    try:
        head = yaml.load(p.read_text(), Loader=_TaskYamlLoader)  # noqa: S506 (a SafeLoader)
    except (OSError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise BenchmarkError(f"config error: {FIELD}: {spec}: not a readable task YAML ({_first_line(e)})") from None
    name = (head.get("task") or head.get("group")) if isinstance(head, dict) else None
    if not isinstance(name, str):
        raise BenchmarkError(f"config error: {FIELD}: {spec}: a task YAML needs a 'task' (or 'group') name")
    return [(name, str(p), p, head.get("dataset_path"))]


def _units(cfg: BenchmarksConfig, tm) -> list[tuple[str, Any, Any]]:
    """(name, what TaskManager.load takes, its dataset) for each task or group to run. A local YAML
    task goes as its config with the data paths read from its folder (:func:`localize`); lm-eval's
    own tasks, groups and tags by name or path."""
    import lm_eval.tasks as lm_tasks
    from lm_eval.tasks._yaml_loader import load_yaml  # the YAML as lm-eval reads it: includes, !function

    builtin = Path(lm_tasks.__file__).parent
    units = []
    for spec in cfg.tasks:
        for name, by, path, dataset in _entries(spec, tm):
            full = load_yaml(path, resolve_func=True) if path is not None and builtin not in path.parents else {}
            if "task" in full and not {"group", "class"} & set(full):
                full = localize(full, path.parent)
                units.append((full["task"], full, full.get("dataset_path")))
            else:
                units.append((name, by, dataset))
    return units


def _first_line(e: BaseException) -> str:
    text = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    lines = [x for x in text.strip().splitlines() if x.strip()]
    return lines[0].strip() if lines else type(e).__name__


def _offline_error(e: BaseException) -> bool:
    text = f"{type(e).__name__} {e}"
    return isinstance(e, ConnectionError) or "OfflineModeIsEnabled" in text or "offline" in text.lower()


def load_tasks(cfg: BenchmarksConfig) -> tuple[Any, list]:
    """(TaskManager, the Task/Group objects to evaluate), their datasets loaded. Raises
    :class:`BenchmarkError` naming the task that cannot be loaded."""
    require_lm_eval()
    tm = _task_manager(cfg)
    objects = []
    for name, spec, dataset in _units(cfg, tm):
        try:
            out = tm.load([spec])
        except Exception as e:  # lm-eval and datasets raise many kinds; each is one line naming the task
            if _offline_error(e):
                what = f"its dataset {dataset!r} is" if isinstance(dataset, str) else "a dataset of it is"
                raise BenchmarkError(
                    f"config error: {FIELD}: task {name!r}: {what} not available offline "
                    f"({_first_line(e)}): use a local task YAML (dataset_path: json with "
                    "dataset_kwargs.data_files) or download the dataset into the Hugging Face datasets "
                    "cache beforehand") from None
            raise BenchmarkError(f"config error: {FIELD}: task {name!r} cannot be loaded: "
                                 f"{type(e).__name__}: {_first_line(e)}") from None
        groups = out.get("groups") or {}
        objects += [groups[name]] if name in groups else list(out["tasks"].values())
    return tm, objects


# Running and naming.

@contextmanager
def _versions_only_env_info():
    """simple_evaluate records the machine with torch's collect_env, which runs ``pip list`` (about
    7 s a call on 2 busy CPU cores) for a report nothing here keeps: record the versions only."""
    import lm_eval
    import transformers
    from lm_eval import evaluator

    saved = evaluator.add_env_info
    evaluator.add_env_info = lambda storage: storage.update(
        {"lm_eval_version": lm_eval.__version__, "transformers_version": transformers.__version__})
    try:
        yield
    finally:
        evaluator.add_env_info = saved


def _name(text: str) -> str:
    return "".join(c if c in _MLFLOW_SAFE else "_" for c in str(text))


def flatten_results(results: dict) -> dict[str, float]:
    """lm-eval's ``results`` (``{task: {"acc,none": 0.5, "acc_stderr,none": 0.1, ...}}``) as
    ``{"<task>/acc": 0.5, "<task>/acc_stderr": 0.1}``; non-numeric values ("N/A") are left out."""
    out = {}
    for task, row in results.items():
        for key, value in row.items():
            if "," not in key or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            metric, filt = key.split(",", 1)
            out[f"{_name(task)}/{_name(metric)}" + ("" if filt == "none" else f"/{_name(filt)}")] = float(value)
    return out


def evaluate_model(model, tok, cfg: BenchmarksConfig, tm, tasks: list) -> dict[str, float]:
    """``{"<task>/<metric>": value}`` of one model (a transformers causal LM, on its device) on ``tasks``."""
    lm_eval = require_lm_eval()
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=cfg.batch_size)
    with _versions_only_env_info():
        out = lm_eval.simple_evaluate(lm, tasks=tasks, task_manager=tm, limit=cfg.limit,
                                      num_fewshot=cfg.num_fewshot, bootstrap_iters=cfg.bootstrap_iters,
                                      log_samples=False)
    return flatten_results(out["results"])


def run_benchmarks(cfg: BenchmarksConfig, policy, reference_loader: Callable[[], Any], tok) -> dict[str, float]:
    """The benchmark metrics of ``policy`` and of the reference (``reference_loader()``, loaded after the
    policy's run and freed before returning): ``bench/``, ``bench_ref/`` and ``bench_delta/`` (policy -
    reference, not for standard errors). ``{}`` without tasks. The tasks are loaded first, so a task
    that cannot be loaded fails before any model runs."""
    if not cfg.tasks:
        return {}
    tm, tasks = load_tasks(cfg)
    mine = evaluate_model(policy, tok, cfg, tm, tasks)
    reference = reference_loader()
    try:
        ref = evaluate_model(reference, tok, cfg, tm, tasks)
    finally:
        del reference
        gc.collect()
    metrics = {f"bench/{k}": v for k, v in mine.items()}
    metrics.update({f"bench_ref/{k}": v for k, v in ref.items()})
    metrics.update({f"bench_delta/{k}": v - ref[k] for k, v in mine.items()
                    if k in ref and not k.split("/")[1].endswith("_stderr")})
    return metrics
