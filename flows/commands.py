"""What each ``dpo`` command does (the parser is :mod:`flows.cli`). Each command imports the engine
and Prefect inside itself, for start-up time: ``dpo --help`` and a usage error answer at once."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

from data_contracts.config import ConfigError, load_config, parse_overrides
from data_contracts.helpers import redact_credentials
from data_contracts.state import mlflow_uri, project_root
from flows.prefect_server import check_prefect_api, require_prefect_server, start_local_server


def default_config_path() -> str | None:
    root = project_root()
    p = root / "configs" / "default.yaml" if root else None
    return str(p) if p and p.is_file() else None


def config_of(args):
    config = args.config
    if config is None:  # a stage command: the run folder's own config, else the default
        run_config = Path(args.run_dir) / "config.yaml" if getattr(args, "run_dir", None) else None
        config = str(run_config) if run_config and run_config.is_file() else default_config_path()
    return load_config(config, args.set)


def cmd_run(args) -> int:
    from dpo_engine.pipeline import prepare, summary_table
    from flows.dpo import dpo

    if args.trl:  # --trl-config FILE: a TRL file (the flow below reads it as one too)
        from flows.config_commands import require_trl_file

        require_trl_file(args.config)
    overrides = parse_overrides(args.set)  # typed once: the flow gets these values
    if args.run_name:
        overrides["run_name"] = args.run_name
    # fail fast on user errors, before Prefect starts; the flow takes this config as it is
    cfg = prepare(args.config, overrides or None, hand_over=True)
    check_prefect_api()
    t0 = time.perf_counter()
    summary = dpo(config=args.config, overrides=overrides or None)
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


def sweep_grid(args) -> dict[str, list] | list[dict]:
    """The sweep's variants from ``--grid`` (every combination) or ``--variant`` (a list)."""
    if bool(args.grid) == bool(args.variant):
        raise ConfigError("sweep: give either --grid (every combination) or --variant (a list of "
                          "variants), not both and not neither")
    from dpo_engine.sweep import parse_grid, parse_variant

    return parse_grid(args.grid) if args.grid else [parse_variant(v) for v in args.variant]


def cmd_sweep(args) -> int:
    from dpo_engine.sweep import expand_grid, stop_options
    from dpo_engine.sweep.plan import sweep_name, variant_configs
    from flows.sweep import dpo_sweep

    grid = sweep_grid(args)
    overrides = parse_overrides(args.set)  # typed once: the flow gets these values
    variants = expand_grid(grid)
    if args.parallel < 1:
        raise ConfigError(f"sweep: --parallel must be >= 1 (got {args.parallel})")
    stop = stop_options(args.stop_margin, args.stop_metric, args.stop_mode)
    name = sweep_name(args.run_name)
    # fail fast on user errors, before Prefect starts; the flow takes these configs as they are
    variant_configs(args.config, overrides or None, name, variants, stop, hand_over=True)
    if args.workers:
        require_prefect_server("dpo sweep --workers")
    check_prefect_api()
    summary = dpo_sweep(grid=grid, metric=args.metric, parallel=args.parallel, stop_margin=args.stop_margin,
                        stop_metric=args.stop_metric, stop_mode=args.stop_mode, workers=args.workers,
                        config=args.config, overrides=overrides or None, run_name=name)
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


def stage_command(stage: str):
    def run(args) -> int:
        from dpo_engine.stages.index import load_result
        from dpo_engine.stages.table import STAGE

        cfg = config_of(args)
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
        return stage_command("validate")(args)
    if args.out is None:
        raise ConfigError("dpo validate INPUT needs --out DIR")
    from data_contracts.errors import DataPolicyError
    from data_contracts.validation import check_not_empty, validate_split
    from dpo_engine.modeling import ModelError, load_processor, load_tokenizer, resolve_model_path

    # checking a file checks all of it: without --config, TRL's defaults (max_length 1024, no row
    # limits), not the demo run's; --config opts into a run's settings
    overrides = list(args.set)
    if args.max_length:
        overrides.append(f"data.max_length={args.max_length}")
    if args.format:
        overrides.append(f"data.format={args.format}")
    cfg = load_config(args.config, overrides)
    tok_src = args.tokenizer
    if tok_src is None:
        try:
            tok_src = resolve_model_path(cfg.model.name_or_path)
        except ModelError as e:
            raise ConfigError(f"dpo validate: give --tokenizer FOLDER_OR_ID (the tokenizer of the model you will "
                              f"train): the config's model {cfg.model.name_or_path!r} is not available here ({e})") \
                from None
    tok = load_tokenizer(cfg.model, tok_src)
    proc = load_processor(cfg.model, tok_src, tok)  # a vision-language model: images are checked too
    rep = validate_split(args.input, Path(args.out), tok, cfg.data, split="input", processor=proc)
    check_not_empty(rep, Path(args.out), DataPolicyError)  # no usable pair: exit 3 (flows.cli), as a failed policy
    limited = f", {rep['limited_out']} over data.eval_limit" if rep.get("limited_out") else ""
    print(f"validate: {rep['valid']}/{rep['rows_in']} valid, {rep['rejected']} rejected, "
          f"{rep.get('duplicates', 0)} duplicates{limited} (max_length {cfg.data.max_length}, "
          f"{'config ' + str(args.config) if args.config else 'TRL defaults'}) -> {args.out}")
    return 0


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
    from prefect import serve

    from flows.deployments import served_deployments

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
        print(f"serving deployments dpo/full (schedule {args.cron!r} UTC) and dpo-sweep/sweep; in another "
              f"shell:\n  export PREFECT_API_URL={os.environ['PREFECT_API_URL']}\n"
              f"  prefect deployment run dpo/full --watch\n"
              f"  prefect deployment run dpo-sweep/sweep --param grid='{{\"loss.beta\": [0.05, 0.1]}}' --watch\n"
              f"Ctrl-C stops")
        serve(*served_deployments(args.config, args.cron))
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    return 0


def cmd_compare(args) -> int:
    import pandas as pd

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
    with pd.option_context("display.max_columns", None, "display.width", 200):
        print(df.to_string(index=False))
    print(f"plot: {tracking.compare_plot(df, args.plot)}")
    return 0
