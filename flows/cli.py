"""The ``dpo`` command line: the whole flow, each stage on its own, serving and comparing.

User errors (bad config, missing file, unreachable server, bad data) print one line and exit 1
(2 when data fails its validation policy); no traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import flows  # noqa: F401  (sets the project-local state environment before prefect is imported)
from data_contracts.config import ConfigError, load_config
from data_contracts.state import mlflow_uri, project_root
from data_contracts.helpers import redact_credentials

NIGHTLY_CRON = "0 2 * * *"
SWEEP_GRID = {"loss.beta": [0.05, 0.1, 0.2]}  # default grid of the dpo/sweep deployment


def default_config_path() -> str | None:
    root = project_root()
    p = root / "configs" / "default.yaml" if root else None
    return str(p) if p and p.is_file() else None


def _cfg(args):
    config = args.config
    if config is None:  # a stage command: the run folder's own config, else the default
        run_config = Path(args.run_dir) / "config.yaml" if getattr(args, "run_dir", None) else None
        config = str(run_config) if run_config and run_config.is_file() else default_config_path()
    return load_config(config, args.set)


def _add_config_args(p: argparse.ArgumentParser, with_run_dir: bool = False) -> None:
    p.add_argument("--config", "-c", default=None if with_run_dir else default_config_path(),
                   help="run config YAML (default: " + ("the run folder's config.yaml, else " if with_run_dir
                                                        else "") + "configs/default.yaml of this checkout)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field, e.g. --set train.learning_rate=1e-6 (repeatable)")
    if with_run_dir:
        p.add_argument("--run-dir", required=True, type=Path,
                       help="run folder: earlier stages' results are read from it, this stage's written to it")


class PrefectUnavailable(RuntimeError):
    pass


def check_prefect_api(timeout: float = 5.0) -> None:
    """With PREFECT_API_URL set, the server must answer; without it a temporary local API is used."""
    url = os.environ.get("PREFECT_API_URL")
    if not url:
        return
    import urllib.request
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=timeout):
            pass
    except Exception as e:  # noqa: BLE001 - any failure means unreachable
        raise PrefectUnavailable(f"cannot reach the Prefect API at {url} ({getattr(e, 'reason', e)}); "
                                 "start it (prefect server start --host 127.0.0.1) or unset PREFECT_API_URL") from None


# ------------------------------------------------------------------------------ commands

def cmd_run(args) -> int:
    overrides = list(args.set) + ([f"run_name={args.run_name}"] if args.run_name else [])
    cfg = load_config(args.config, overrides)  # fail fast on user errors, before Prefect starts
    from dpo_engine.pipeline import preflight, summary_table

    preflight(cfg)
    check_prefect_api()
    from flows.dpo import dpo

    t0 = time.perf_counter()
    summary = dpo(config=args.config, overrides={k: v for k, v in
                                                 (o.split("=", 1) for o in overrides)} or None)
    wall = time.perf_counter() - t0
    if summary["status"] == "skipped":
        print(f"\n{summary['reason']}\nsummary: {Path(summary['run_dir']) / 'summary.json'}")
        return 0
    print("\n" + "=" * 60)
    for s in summary["stages"].values():
        if s.get("summary"):
            print(s["summary"])
    print("=" * 60)
    print(f"run folder:        {summary['run_dir']}")
    print(f"summary:           {Path(summary['run_dir']) / 'summary.json'}")
    print(f"MLflow:            {redact_credentials(mlflow_uri(cfg))}  (experiment {cfg.registry.experiment!r}, run {summary['mlflow_run_id']})")
    if summary.get("registered_version"):
        print(f"registered model:  models:/{summary['registered_model']}/{summary['registered_version']} "
              f"(aliases: {', '.join(summary.get('aliases') or []) or 'none'})")
    print(f"wall time:         {wall:.1f}s\n")
    print(summary_table(summary))
    return 0


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["loss.beta=0.1,0.3"]`` -> ``{"loss.beta": [0.1, 0.3]}`` (values are YAML scalars)."""
    import yaml

    grid = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or not raw.strip():
            raise ConfigError(f"sweep: --grid {item!r} must look like section.field=v1,v2")
        grid[key.strip()] = [yaml.safe_load(v) for v in raw.split(",")]
    return grid


def parse_variant(item: str) -> dict[str, object]:
    """``"loss.beta=0.1,loss.loss_type=[sigmoid,sft]"`` -> ``{"loss.beta": 0.1, "loss.loss_type":
    ["sigmoid", "sft"]}``: comma-separated ``section.field=value`` pairs (values are YAML, so a value
    may itself hold commas inside brackets)."""
    import re

    import yaml

    out = {}
    for pair in re.split(r",(?=\s*[A-Za-z_][\w]*\.[\w.]+\s*=)", item):
        key, sep, raw = pair.partition("=")
        if not sep or not key.strip() or not raw.strip():
            raise ConfigError(f"sweep: --variant {item!r} must look like section.field=v[,section.field=v]")
        try:
            out[key.strip()] = yaml.safe_load(raw)
        except yaml.YAMLError:
            raise ConfigError(f"sweep: --variant {item!r}: {key.strip()}: value {raw!r} is not valid YAML") \
                from None
    return out


def sweep_grid(args) -> dict[str, list] | list[dict]:
    """The sweep's variants from ``--grid`` (every combination) or ``--variant`` (a list)."""
    if bool(args.grid) == bool(args.variant):
        raise ConfigError("sweep: give either --grid (every combination) or --variant (a list of "
                          "variants), not both and not neither")
    return parse_grid(args.grid) if args.grid else [parse_variant(v) for v in args.variant]


def cmd_sweep(args) -> int:
    from dpo_engine.sweep import check_stop_configs, expand_grid, stop_options

    grid = sweep_grid(args)
    overrides = dict(o.split("=", 1) for o in args.set)
    variants = expand_grid(grid)
    if args.parallel < 1:
        raise ConfigError(f"sweep: --parallel must be >= 1 (got {args.parallel})")
    stop = stop_options(args.stop_margin, args.stop_metric, args.stop_mode)
    cfgs = [load_config(args.config, list(args.set) + [f"{k}={val}" for k, val in v.items()])
            for v in variants]  # fail fast on user errors, before Prefect starts
    if stop:
        check_stop_configs(cfgs)
    if args.workers:
        require_prefect_server("dpo sweep --workers")
    check_prefect_api()
    from flows.dpo import dpo

    summary = dpo(config=args.config, overrides=overrides or None, run_name=args.run_name,
                  grid=grid, metric=args.metric, parallel=args.parallel, stop_margin=args.stop_margin,
                  stop_metric=args.stop_metric, stop_mode=args.stop_mode, workers=args.workers)
    print("\n" + "=" * 60)
    for i, v in enumerate(summary["variants"]):
        mark = "*" if i == summary["best"] else " "
        status = "" if v.get("status", "completed") == "completed" else f"  {v['status']}"
        where = f"  on {v['ran_on']}" if summary.get("workers") else ""
        print(f"{mark} {i:02d} {v['overrides']}  {summary['metric']}={v[summary['metric']]}  "
              f"{v['run_dir']}{status}{where}")
    print("=" * 60)
    print(f"sweep folder:      {summary['run_dir']}")
    print(f"MLflow parent run: {summary['mlflow_parent_run_id']}")
    if summary.get("registered_version"):
        print(f"registered model:  models:/{summary['registered_model']}/{summary['registered_version']} "
              f"(aliases: {', '.join(summary.get('aliases') or []) or 'none'})")
    return 0


def _stage_cmd(stage: str):
    def run(args) -> int:
        from dpo_engine.stages.index import load_result
        from dpo_engine.stages.table import STAGE

        cfg = _cfg(args)
        run_dir = args.run_dir.resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        res = STAGE[stage].run(cfg, run_dir, {s: load_result(run_dir, s) for s in STAGE[stage].inputs})
        print(res["summary"])
        print(f"result: {run_dir / (stage + '.json')}")
        return 0
    return run


def cmd_validate(args) -> int:
    if args.input is None:
        if args.run_dir is None:
            raise ConfigError("dpo validate: give INPUT --out DIR (one file) or --run-dir DIR (the pipeline stage)")
        return _stage_cmd("validate")(args)
    if args.out is None:
        raise ConfigError("dpo validate INPUT needs --out DIR")
    from data_contracts.errors import DataPolicyError
    from data_contracts.validation import validate_split
    from dpo_engine.modeling import load_tokenizer, resolve_model_path

    overrides = list(args.set)
    if args.max_length:
        overrides.append(f"data.max_length={args.max_length}")
    if args.format:
        overrides.append(f"data.format={args.format}")
    cfg = load_config(args.config, overrides)
    tok_src = args.tokenizer or resolve_model_path(cfg.model.name_or_path)
    tok = load_tokenizer(cfg.model, tok_src)
    try:
        rep = validate_split(args.input, Path(args.out), tok, cfg.data, split="input")
    except DataPolicyError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"validate: {rep['valid']}/{rep['rows_in']} valid, {rep['rejected']} rejected, "
          f"{rep.get('duplicates', 0)} duplicates -> {args.out}")
    return 0


def start_local_server(port: int) -> "subprocess.Popen":
    """A Prefect server on 127.0.0.1:port (state under PREFECT_HOME), returned once healthy."""
    import subprocess
    import urllib.request

    log = Path(os.environ["PREFECT_HOME"]) / "server.log"
    env = {**os.environ, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/api"
    for _ in range(120):
        if proc.poll() is not None:
            raise PrefectUnavailable(f"the Prefect server exited (code {proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2):
                return proc
        except OSError:
            time.sleep(1)
    proc.terminate()
    raise PrefectUnavailable(f"the Prefect server did not answer on {url} within 120 s; see {log}")


def served_deployments(config: str | None, cron: str = NIGHTLY_CRON) -> list:
    """What ``dpo serve`` serves: ``dpo/full`` on the nightly schedule (UTC; scheduled runs skip
    when nothing changed) and ``dpo/sweep``, each at most one run at a time."""
    from prefect.schedules import Cron

    from flows.dpo import dpo

    params = {"config": str(Path(config).resolve())} if config else {}
    nightly = Cron(cron, timezone="UTC",
                   parameters={**params, "overrides": {"tracking.skip_unchanged": True}})
    return [dpo.to_deployment(name="full", schedules=[nightly], parameters=params, concurrency_limit=1,
                              description="DPO pipeline: validate, precompute, train, evaluate, register"),
            dpo.to_deployment(name="sweep", parameters={**params, "grid": SWEEP_GRID}, concurrency_limit=1,
                              description="DPO sweep: each variant trained and evaluated as a child MLflow "
                              "run, only the best registered")]


def require_prefect_server(what: str) -> None:
    """Task workers and the flows that feed them must share one Prefect server (not a temporary one)."""
    if not os.environ.get("PREFECT_API_URL"):
        raise ConfigError(f"{what} needs a Prefect server shared with the sweep: set PREFECT_API_URL "
                          "(e.g. http://127.0.0.1:4200/api, the server `dpo serve` starts)")
    check_prefect_api()


def cmd_sweep_worker(args) -> int:
    if args.limit < 1:
        raise ConfigError(f"sweep-worker: --limit must be >= 1 (got {args.limit})")
    require_prefect_server("dpo sweep-worker")
    from flows.sweep import serve_variants

    print(f"sweep worker {os.uname().nodename}:{os.getpid()}: serving sweep variants ({args.limit} at a "
          f"time) from {os.environ['PREFECT_API_URL']}; Ctrl-C stops", flush=True)
    try:
        serve_variants(limit=args.limit)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_serve(args) -> int:
    import signal

    def _stop(signum, frame):  # SIGTERM stops like Ctrl-C, so the local server is stopped too
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    server = None
    if not os.environ.get("PREFECT_API_URL"):
        server = start_local_server(args.port)
        os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{args.port}/api"
        print(f"Prefect server on http://127.0.0.1:{args.port} (UI and API; log in "
              f"{Path(os.environ['PREFECT_HOME']) / 'server.log'})")
    else:
        check_prefect_api()
    try:
        from prefect import serve

        print(f"serving deployments dpo/full (schedule {args.cron!r} UTC) and dpo/sweep; in another shell:\n"
              f"  export PREFECT_API_URL={os.environ['PREFECT_API_URL']}\n"
              f"  prefect deployment run dpo/full --watch\nCtrl-C stops")
        serve(*served_deployments(args.config, args.cron))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    return 0


def cmd_compare(args) -> int:
    from dpo_engine import tracking

    cfg = load_config(args.config, args.set)
    tracking.connect(mlflow_uri(cfg))
    try:
        df = tracking.compare_runs(args.experiment or cfg.registry.experiment, last=args.last,
                                   metrics=args.metric or None, sweep=args.sweep)
    except ValueError as e:
        raise ConfigError(f"compare: {e}") from None
    if df.empty:
        print(f"no runs in experiment {args.experiment or cfg.registry.experiment!r}")
        return 0
    import pandas as pd
    with pd.option_context("display.max_columns", None, "display.width", 200):
        print(df.to_string(index=False))
    print(f"plot: {compare_plot(df, args.plot)}")
    return 0


def compare_plot(df, path: str | None) -> Path:
    """PNG overlaying the runs' reward-margin and accuracy curves and their eval win-rates."""
    import datetime as dt

    from data_contracts.state import state_home
    from dpo_engine.evaluation import plots
    from dpo_engine import tracking

    if path is None:
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
        path = state_home() / "compare" / f"compare-{stamp}.png"
    curves, win_rates = {}, {}
    for row in df.itertuples(index=False):
        label = f"{row.run_name} ({row.run_id[:6]})"
        curves[label] = tracking.metric_histories(row.run_id, list(plots.COMPARE_CURVES))
        win_rates[label] = tracking.win_rate(row.run_id)
    return plots.compare_runs(curves, win_rates, path)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dpo", description="DPO alignment pipeline: validate -> precompute reference log-probs -> "
        "train -> evaluate -> register. State lives under $DPO_HOME (default: <checkout>/.dpo).")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the whole dpo flow (local Prefect, local MLflow by default)",
                       description="Run all five stages as a Prefect flow and print where to look.")
    _add_config_args(p)
    p.add_argument("--run-name", help="run folder name (default: time stamp + config hash)")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("validate", help="stage 1: validate/convert/tokenize preference data",
                       description="Either `dpo validate INPUT --out DIR` (one file: writes valid.parquet, "
                       "rejects.parquet, report.json; exit 2 if the data fails policy) or "
                       "`dpo validate --run-dir DIR` (the pipeline stage on the config's data).")
    p.add_argument("input", nargs="?", help="a data file/folder (omit to use the config's data)")
    p.add_argument("--out", help="output folder for INPUT mode")
    p.add_argument("--format", help="input layout (default: auto)")
    p.add_argument("--tokenizer", help="tokenizer folder or id (default: the config's model)")
    p.add_argument("--max-length", type=int, help="max prompt+completion tokens")
    _add_config_args(p)
    p.add_argument("--run-dir", type=Path, help="run folder (pipeline-stage mode)")
    p.set_defaults(fn=cmd_validate)

    for stage, text in (("precompute", "stage 2: reference log-probs of the validated pairs, to Parquet"),
                        ("train", "stage 3: DPO training against the cached reference log-probs"),
                        ("evaluate", "stage 4: held-out metrics and judged generations, policy vs reference"),
                        ("register", "stage 5: log the model to MLflow, register a version, set aliases")):
        p = sub.add_parser(stage, help=text, description=text + ". Reads earlier stages' results from "
                           "--run-dir and writes its own there; needs no Prefect server.")
        _add_config_args(p, with_run_dir=True)
        p.set_defaults(fn=_stage_cmd(stage))

    p = sub.add_parser("serve", help="serve the deployment dpo/full (nightly cron) on a Prefect server",
                       description="Serve deployment dpo/full with a nightly schedule. Without PREFECT_API_URL "
                       "it first starts a local Prefect server on 127.0.0.1:--port (stopped on exit); with "
                       "it, it serves to that server.")
    p.add_argument("--port", type=int, default=4200, help="port of the local server (default 4200)")
    p.add_argument("--config", "-c", default=default_config_path(), help="default config of the deployment")
    p.add_argument("--cron", default=NIGHTLY_CRON, help=f"schedule, UTC (default {NIGHTLY_CRON!r})")
    p.set_defaults(fn=cmd_serve)

    p = sub.add_parser("sweep", help="sweep: train+evaluate each variant, register the best",
                       description="Validate and precompute once, train and evaluate every combination of "
                       "the --grid values (or each --variant) as a child MLflow run under one parent, "
                       "register only the best by --metric.")
    _add_config_args(p)
    p.add_argument("--grid", "-g", action="append", default=[], metavar="SECTION.FIELD=V1,V2",
                   help="values to try for one field, e.g. --grid loss.beta=0.1,0.3 (repeatable; every "
                   "combination of the fields is a variant)")
    p.add_argument("--variant", action="append", default=[], metavar="SECTION.FIELD=V[,SECTION.FIELD=V]",
                   help="one variant's overrides, e.g. --variant loss.beta=0.1,loss.loss_type=ipo "
                   "(repeatable; instead of --grid)")
    p.add_argument("--metric", default="eval/win_rate", help="pick the best variant by this eval "
                   "metric, higher is better (default eval/win_rate)")
    p.add_argument("--run-name", help="sweep name (default: sweep-<UTC time>)")
    p.add_argument("--parallel", type=int, default=1, metavar="N",
                   help="train/evaluate N variants at a time, bounded by the Prefect global concurrency "
                   "limit 'dpo-train' (set to N slots); default 1: one after another (one GPU)")
    p.add_argument("--stop-margin", type=float, metavar="M",
                   help="stop a variant at a train.eval_steps checkpoint when its --stop-metric is behind "
                   "the best value any variant reached at that step by more than M (needs "
                   "train.eval_steps); default: no early stop")
    p.add_argument("--stop-metric", metavar="METRIC",
                   help="periodic eval metric compared by --stop-margin (default eval/rewards/accuracies; "
                   "also eval/loss, eval/rewards/margins, ...)")
    p.add_argument("--stop-mode", choices=("max", "min"),
                   help="whether higher or lower --stop-metric is better (default: min for eval/loss, "
                   "else max)")
    p.add_argument("--workers", action="store_true",
                   help="run the variants on Prefect task workers (`dpo sweep-worker`, e.g. one per GPU "
                   "or machine) instead of in this process; needs PREFECT_API_URL and a state home "
                   "($DPO_HOME) the workers share; --parallel still bounds how many run at once")
    p.set_defaults(fn=cmd_sweep)

    p = sub.add_parser("sweep-worker", help="a Prefect task worker that runs sweep variants",
                       description="Serve sweep variants submitted by `dpo sweep --workers` (or the dpo/sweep "
                       "deployment with workers=true): each is trained and evaluated in this process, on "
                       "its device (set CUDA_VISIBLE_DEVICES to give each worker its own GPU). Needs "
                       "PREFECT_API_URL and the sweep's state home ($DPO_HOME).")
    p.add_argument("--limit", type=int, default=1, metavar="N", help="variants at a time (default 1)")
    p.set_defaults(fn=cmd_sweep_worker)

    p = sub.add_parser("compare", help="table and plot of runs of an MLflow experiment",
                       description="Print key params and metrics of the latest runs of an experiment and "
                       "write a PNG overlaying their reward-margin/accuracy curves and eval win-rates.")
    _add_config_args(p)
    p.add_argument("--experiment", help="experiment name (default: the config's tracking.experiment)")
    p.add_argument("--last", type=int, default=10)
    p.add_argument("--sweep", metavar="NAME", help="one sweep as one table: its variants (overrides, "
                   "status, best marked *), by the sweep's name (--run-name of dpo sweep) or parent run id")
    p.add_argument("--metric", action="append", help="metric to show (repeatable)")
    p.add_argument("--plot", help="where to write the comparison PNG (default: "
                   "$DPO_HOME/compare/compare-<UTC time>.png)")
    p.set_defaults(fn=cmd_compare)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.environ.get("DPO_DEBUG"):
        return args.fn(args)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # user-facing errors: one line, no traceback
        from data_contracts.errors import user_error

        err = user_error(e)  # Prefect may wrap the original exception
        if err is None:
            raise
        print(f"error: {str(err).removeprefix('error: ')}", file=sys.stderr)
        return 2 if type(err).__name__ == "DataPolicyError" else 1


if __name__ == "__main__":
    sys.exit(main())
