"""The ``dpo`` command line: the whole flow, each stage on its own, sweeps, serving and comparing.
This module is the argument parser; what each command does is in :mod:`flows.commands`.

Exit codes: 0 done; 1 a user error (bad config, missing file, unreachable server, bad data), one
line, no traceback; 2 a usage error (argparse: unknown option, missing argument); 3 the data failed
its validation policy (too many rejected rows, or no valid row at all: ``dpo validate``, ``dpo run``).

The run config is the first argument of ``dpo run``/``sweep``/``compare`` (or ``--config``): our
nested YAML, or a flat TRL ``DPOConfig``/``trl dpo`` file, recognised by itself (``--trl-config FILE``
insists on it); ``dpo config show`` prints any of them resolved, with each field's description.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import flows  # noqa: F401  (sets the project-local state environment before prefect is imported)
from data_contracts.errors import user_error
from data_contracts.helpers import redact_credentials
from flows.commands import (
    cmd_compare,
    cmd_run,
    cmd_serve,
    cmd_sweep,
    cmd_sweep_worker,
    cmd_validate,
    default_config_path,
    stage_command,
)
from flows.config_commands import cmd_config_from_trl, cmd_config_show
from flows.deployments import NIGHTLY_CRON


EXIT_USER_ERROR, EXIT_USAGE, EXIT_DATA_POLICY = 1, 2, 3  # EXIT_USAGE: argparse's own


def add_config_args(p: argparse.ArgumentParser, with_run_dir: bool = False, positional: bool = False) -> None:
    if positional:  # `dpo run my.yaml`, as axolotl and torchtune take it; resolved by resolve_config
        p.add_argument("config_file", nargs="?", metavar="CONFIG", help="run config YAML: ours, or a flat TRL "
                       "DPOConfig / `trl dpo` file (recognised by itself); the same as --config")
        p.set_defaults(config_parser=p)  # for resolve_config's usage errors
    p.add_argument("--config", "-c", default=None if with_run_dir or positional else default_config_path(),
                   help="run config YAML (default: " + ("the run folder's config.yaml, else " if with_run_dir
                                                        else "") + "configs/default.yaml of this checkout)")
    p.add_argument("--set", "-s", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field, e.g. --set train.learning_rate=1e-6 (repeatable)")
    if with_run_dir:
        p.add_argument("--run-dir", required=True, type=Path,
                       help="run folder: earlier stages' results are read from it, this stage's written to it")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="dpo", description="DPO alignment pipeline: validate -> precompute reference log-probs -> "
        "train -> evaluate -> register. State lives under $DPO_HOME (default: <checkout>/.dpo).")
    sub = ap.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    p = sub.add_parser("run", help="run the whole dpo flow (local Prefect, local MLflow by default)",
                       description="Run all five stages as a Prefect flow and print where to look. The config "
                       "is our YAML or a TRL DPOConfig / `trl dpo` file (its notes say what was translated, "
                       "what is ignored and why); every field: dpo config show --defaults.")
    add_config_args(p, positional=True)
    p.add_argument("--trl-config", metavar="FILE", help="a TRL DPOConfig / `trl dpo --config` YAML (flat TRL "
                   "names: model_name_or_path, dataset_name, learning_rate, beta, ...), translated into our "
                   "config; --set overrides apply after it, with our names (dpo config from-trl FILE shows "
                   "the translation)")
    p.add_argument("--run-name", help="run folder name (default: time stamp + config hash)")
    p.set_defaults(fn=cmd_run)

    p = sub.add_parser("validate", help="stage 1: validate/convert/tokenize preference data",
                       description="Either `dpo validate INPUT --out DIR` (one file: writes valid.parquet, "
                       "rejects.parquet, report.json; exit 3 if the data fails policy) or "
                       "`dpo validate --run-dir DIR` (the pipeline stage on the config's data).")
    p.add_argument("input", nargs="?", help="a data file/folder (omit to use the config's data)")
    p.add_argument("--out", help="output folder for INPUT mode")
    p.add_argument("--format", help="input layout (default: auto)")
    p.add_argument("--tokenizer", help="tokenizer folder or id (default: the config's model)")
    p.add_argument("--max-length", type=int, help="max prompt+completion tokens (INPUT mode default: the "
                   "config's data.max_length, TRL's 1024 without --config)")
    p.add_argument("--config", "-c", default=None,
                   help="run config YAML: INPUT mode checks with its data settings (default: TRL's defaults "
                   "and every row); --run-dir mode: default the run folder's config.yaml, else "
                   "configs/default.yaml")
    p.add_argument("--set", "-s", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                   help="override one config field, e.g. --set data.format=sharegpt (repeatable)")
    p.add_argument("--run-dir", type=Path, help="run folder (pipeline-stage mode)")
    p.set_defaults(fn=cmd_validate)

    for stage, text in (("precompute", "stage 2: reference log-probs of the validated pairs, to Parquet"),
                        ("train", "stage 3: DPO training against the cached reference log-probs"),
                        ("evaluate", "stage 4: held-out metrics and judged generations, policy vs reference"),
                        ("register", "stage 5: log the model to MLflow, register a version, set aliases")):
        p = sub.add_parser(stage, help=text, description=text + ". Reads earlier stages' results from "
                           "--run-dir and writes its own there; needs no Prefect server.")
        add_config_args(p, with_run_dir=True)
        p.set_defaults(fn=stage_command(stage))

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
    add_config_args(p, positional=True)
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
                       description="Serve sweep variants submitted by `dpo sweep --workers` (or the dpo-sweep/sweep "
                       "deployment with workers=true): each is trained and evaluated in this process, on "
                       "its device (set CUDA_VISIBLE_DEVICES to give each worker its own GPU). Needs "
                       "PREFECT_API_URL and the sweep's state home ($DPO_HOME).")
    p.add_argument("--limit", type=int, default=1, metavar="N", help="variants at a time (default 1)")
    p.set_defaults(fn=cmd_sweep_worker)

    p = sub.add_parser("compare", help="table and plot of runs of an MLflow experiment",
                       description="Print key params and metrics of the latest runs of an experiment and "
                       "write a PNG overlaying their reward-margin/accuracy curves and eval win-rates.")
    add_config_args(p, positional=True)
    p.add_argument("--experiment", help="experiment name (default: the config's registry.experiment)")
    p.add_argument("--last", type=int, default=10)
    p.add_argument("--sweep", metavar="NAME", help="one sweep as one table: its variants (overrides, "
                   "status, best marked *), by the sweep's name (--run-name of dpo sweep) or parent run id")
    p.add_argument("--metric", action="append", help="metric to show (repeatable)")
    p.add_argument("--plot", help="where to write the comparison PNG (default: "
                   "$DPO_HOME/compare/compare-<UTC time>.png)")
    p.set_defaults(fn=cmd_compare)

    p = sub.add_parser("config", help="show a config with each field's description, or translate a TRL file",
                       description="`dpo config show [CONFIG] [--set ...]`: the resolved config (default: "
                       "configs/default.yaml; --defaults: the built-in defaults) as YAML, each field under "
                       "its description. `dpo config from-trl FILE`: a TRL DPOConfig / `trl dpo` YAML "
                       "translated into ours (what is ignored and why on stderr).")
    csub = p.add_subparsers(dest="config_cmd", required=True, metavar="ACTION")
    q = csub.add_parser("show", help="the resolved config (or the defaults), each field with its description")
    add_config_args(q, positional=True)
    q.add_argument("--defaults", action="store_true", help="the built-in defaults (no config file)")
    q.set_defaults(fn=cmd_config_show)
    q = csub.add_parser("from-trl", help="print a TRL DPOConfig / `trl dpo` YAML translated into our config")
    q.add_argument("file", metavar="FILE", help="the TRL YAML (flat names: model_name_or_path, beta, ...)")
    q.set_defaults(fn=cmd_config_from_trl)
    return ap


def resolve_config(args) -> None:
    """One config path from the positional CONFIG, --config or --trl-config (two of them: a usage
    error); none: configs/default.yaml (``dpo config show --defaults``: none at all)."""
    given = [(flag, v) for flag, v in (("CONFIG", getattr(args, "config_file", None)), ("--config", args.config),
                                       ("--trl-config", getattr(args, "trl_config", None))) if v]
    if len(given) > 1:
        args.config_parser.error(f"give one config, not {' and '.join(flag for flag, _ in given)}")
    args.trl = bool(given) and given[0][0] == "--trl-config"
    args.config = given[0][1] if given else (None if getattr(args, "defaults", False) else default_config_path())


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if hasattr(args, "config_file"):
        resolve_config(args)
    if os.environ.get("DPO_DEBUG"):
        return args.fn(args)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # user-facing errors: one line, no traceback
        err = user_error(e)  # Prefect may wrap the original exception
        if err is None:
            raise
        print(f"error: {redact_credentials(str(err)).removeprefix('error: ')}", file=sys.stderr)
        return EXIT_DATA_POLICY if type(err).__name__ == "DataPolicyError" else EXIT_USER_ERROR


if __name__ == "__main__":
    sys.exit(main())
