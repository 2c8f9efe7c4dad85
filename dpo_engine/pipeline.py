"""A pipeline run: its config (loaded and checked once, :func:`prepare`), its folder, whether there is
anything new to train on, and summary.json."""

from __future__ import annotations

import datetime as dt
import json
import os
from pathlib import Path
from typing import Any

from data_contracts.config import BUILTIN_DATASET, BUILTIN_MODELS, ConfigError, RunConfig, load_config
from data_contracts.helpers import redact_credentials, write_json, write_text
from data_contracts.layouts import LAYOUTS
from data_contracts.sources import fill_date
from data_contracts.state import mlflow_uri, state_home
from dpo_engine import tracking
from dpo_engine.evaluation import EvaluationError, load_judge
from dpo_engine.evaluation.benchmarks import check_benchmarks
from dpo_engine.modeling import check_config
from dpo_engine.modeling.router import check_router_setting
from dpo_engine.stages.launch import accelerate_config
from dpo_engine.stages.register import config_hash
from dpo_engine.stages.table import STAGES
from dpo_engine.stages.validate import data_fingerprint

# Configs a caller (the CLI) prepared for the flow it starts next in this process: the flow takes
# them as they are instead of loading and checking them a second time. Each is handed over once.
_handed_over: dict[str, RunConfig] = {}


def _inputs_key(config: str | os.PathLike | None, overrides: dict[str, Any] | None) -> str:
    return json.dumps([None if config is None else str(Path(config).resolve()), overrides or {}],
                      sort_keys=True, default=str)


def prepare(config: str | os.PathLike | None, overrides: dict[str, Any] | None = None, *,
            hand_over: bool = False) -> RunConfig:
    """The one way from a config file and overrides to a checked config: load and validate it
    (:func:`data_contracts.config.load_config`), then :func:`preflight` it. ``hand_over``: the
    flow started next in this process with the same inputs gets this config without a second
    load and check. Raises ConfigError (or DataError) naming the field or file."""
    key = _inputs_key(config, overrides)
    if key in _handed_over:
        return _handed_over.pop(key)
    cfg = load_config(config, overrides)
    preflight(cfg)
    if hand_over:
        _handed_over[key] = cfg
    return cfg


def new_run_dir(cfg: RunConfig) -> Path:
    name = cfg.run_name or (dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
                            + "-" + cfg.section_hash("data", "model", "loss", "train")[:6])
    run_dir = state_home() / "runs" / name
    if cfg.run_name:  # named: a re-run continues in the same folder (training resumes there)
        run_dir.mkdir(parents=True, exist_ok=True)
    else:  # two runs started in the same second get a folder each
        run_dir.parent.mkdir(parents=True, exist_ok=True)
        for n in range(2, 1000):
            try:
                run_dir.mkdir()
                break
            except FileExistsError:
                run_dir = run_dir.with_name(f"{name}-{n}")
    write_text(run_dir / "config.yaml", cfg.to_yaml())
    return run_dir


def preflight(cfg: RunConfig) -> None:
    """Fail before any compute on what can be checked cheaply: data paths, judge, MLflow."""
    for field in ("source", "eval_source"):
        src = getattr(cfg.data, field)
        src = fill_date(src) if src else src
        if src and not src.startswith("builtin:") and src.startswith((".", "/", "~")) \
                and not Path(src).expanduser().exists():
            raise ConfigError(f"data.{field}: file not found: {src}")
    if cfg.data.source.startswith("builtin:") and not cfg.data.source.startswith(BUILTIN_DATASET):
        raise ConfigError(f"data.source: unknown builtin dataset {cfg.data.source!r}; known: {BUILTIN_DATASET}")
    if cfg.model.name_or_path.startswith("builtin:") and cfg.model.name_or_path not in BUILTIN_MODELS:
        raise ConfigError(f"model.name_or_path: unknown builtin model {cfg.model.name_or_path!r}; "
                          f"known: {', '.join(BUILTIN_MODELS)}")
    if cfg.data.eval_source is None and cfg.data.eval_fraction == 0 \
            and not cfg.data.source.startswith(BUILTIN_DATASET):
        raise ConfigError("data.eval_fraction is 0 and data.eval_source is not set: evaluation needs "
                          "held-out pairs; set one of them")
    if cfg.data.format not in ("auto", *LAYOUTS):
        raise ConfigError(f"data.format: unknown format {cfg.data.format!r}; known: auto, {', '.join(LAYOUTS)}")
    _check_local_paths(cfg)
    if cfg.eval.judge:
        load_judge(cfg.eval.judge)
    for name, s in cfg.eval.sets.items():  # named evaluation sets: their files and judges
        src = fill_date(s.source)
        if _looks_local(src) and not Path(src).expanduser().exists():
            raise ConfigError(f"eval.sets.{name}.source: file not found: {src}")
        if cfg.eval.set_judge(name):
            try:
                load_judge(cfg.eval.set_judge(name))
            except EvaluationError as e:  # the line names the set's field, not eval.judge
                raise EvaluationError(str(e).replace("eval.judge", f"eval.sets.{name}.judge", 1)) from None
    check_benchmarks(cfg.eval.benchmarks)  # lm-eval installed, local task files exist
    if cfg.registry.enabled:
        tracking.connect(mlflow_uri(cfg))


def _looks_local(path: str) -> bool:
    """A path written as one (./x, ../x, /x, ~/x), not a hub id: it must exist on this machine."""
    return path.startswith((".", "/", "~"))


def _check_local_paths(cfg: RunConfig) -> None:
    """The files and folders the run will read exist on this machine (checked here, not when the config
    is loaded, so a saved config still loads on another machine)."""
    for field, value in (("model.name_or_path", cfg.model.name_or_path), ("model.tokenizer", cfg.model.tokenizer),
                         ("reference.model_path", cfg.reference.model_path)):
        if value and _looks_local(value) and not Path(value).expanduser().exists():
            raise ConfigError(f"{field}: folder not found: {value}")
    tmpl = cfg.model.chat_template_path  # a template file, or a tokenizer folder that has one
    if tmpl and not Path(tmpl).expanduser().exists():
        raise ConfigError(f"model.chat_template_path: file not found: {tmpl}")
    accelerate_config(cfg)  # train.accelerate_config: file not found / not YAML / not a mapping
    check_config(cfg)  # peft.adapter_path holds an adapter; adapter_disabled needs peft.enabled
    check_router_setting(cfg)  # train.router_aux_loss_coef needs a model with a router


def nothing_new(cfg: RunConfig) -> str | None:
    """Why this run would only repeat the current champion (same data fingerprint and config
    hash as tagged on it), or None when there is something new to train on."""
    if not (cfg.registry.enabled and cfg.registry.skip_unchanged):
        return None
    tracking.connect(mlflow_uri(cfg))
    champ = tracking.champion(cfg.registry.model_name)
    if champ is None:
        return None
    if champ.tags.get("config_hash") != config_hash(cfg) \
            or champ.tags.get("data_fingerprint") != data_fingerprint(cfg):
        return None
    return (f"skipped: nothing new (data and config equal those of champion "
            f"{cfg.registry.model_name} version {champ.version})")


def write_summary(run_dir: Path, results: dict[str, dict], status: str, error: str | None = None,
                  reason: str | None = None) -> dict:
    stages = {}
    for s in STAGES:
        r = results.get(s)
        if not r:
            stages[s] = {"status": "not run"}
            continue
        # a result from another run's folder came from the Prefect cache or the stage index
        was_reused = bool(r.get("reused")) or r.get("run_dir", str(run_dir)) != str(run_dir)
        text = r.get("summary", "")
        if was_reused and ": reused" not in text:
            text = f"{s}: reused from run {Path(r['run_dir']).name} ({text.split(': ', 1)[-1]})"
        stages[s] = {"status": "reused" if was_reused else "completed",
                     "seconds": 0.0 if was_reused else r.get("seconds"),
                     "summary": text, "metrics": r.get("metrics", {})}
        if not (Path(run_dir) / f"{s}.json").exists():
            write_json(Path(run_dir) / f"{s}.json", {**r, "reused": was_reused})
    reg = results.get("register", {})
    summary = {
        "run_dir": str(run_dir), "status": status, "error": redact_credentials(error) if error else error,
        "reason": reason, "stages": stages,
        "mlflow_tracking_uri": redact_credentials(os.environ.get("MLFLOW_TRACKING_URI") or "")
        or None,  # user:password in the URI is not written down
        "mlflow_run_id": results.get("train", {}).get("mlflow_run_id"),
        "registered_model": reg.get("model_name"), "registered_version": reg.get("version"),
        "aliases": reg.get("aliases"), "gate_passed": reg.get("gate_passed"),
    }
    write_json(Path(run_dir) / "summary.json", summary)
    return summary


def summary_table(summary: dict) -> str:
    """Evaluation summary, policy vs reference, as a fixed-width text table."""
    m = summary["stages"].get("evaluate", {}).get("metrics", {})
    rows = [("held-out reward accuracy", m.get("eval/rewards/accuracies"), None),
            ("held-out reward margin", m.get("eval/rewards/margins"), None),
            ("held-out DPO loss", m.get("eval/loss"), 0.6931 if "eval/loss" in m else None),
            ("judge score (mean)", m.get("eval/policy_score"), m.get("eval/reference_score")),
            ("response length (chars)", m.get("eval/policy_response_chars"), m.get("eval/reference_response_chars")),
            ("win-rate vs reference", m.get("eval/win_rate"), None),
            ("length-controlled win-rate", m.get("eval/lc_win_rate"), None),
            ("length coefficient", m.get("eval/length_coef"), None),
            ("judge order disagreement", m.get("eval/judge_disagreement"), None),
            ("KL(policy||reference)", m.get("eval/kl_policy_reference"), 0.0 if m else None)]
    fmt = lambda v: "-" if v is None else f"{v:.3f}"
    lines = [f"{'metric':<28}{'policy':>10}{'reference':>12}", "-" * 50]
    lines += [f"{name:<28}{fmt(p):>10}{fmt(r):>12}" for name, p, r in rows if p is not None]
    for name, key in (("win-rate", "eval/win_rate"), ("length-controlled win-rate", "eval/lc_win_rate")):
        if f"{key}_ci_low" in m:
            lines.append(f"{name} 95% CI: [{m[f'{key}_ci_low']:.3f}, {m[f'{key}_ci_high']:.3f}]")
    return "\n".join(lines)
