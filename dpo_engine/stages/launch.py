"""Several processes through ``accelerate launch`` (torchrun): the precompute and train stages.

``train.num_processes > 1`` or ``train.accelerate_config`` makes ``stages.precompute.run`` and
``stages.train.run`` hand themselves to :func:`launch_stage`, which writes the stage's inputs to
``<run>/<stage>/launch/spec.json`` and runs

    accelerate launch [--config_file FILE] [--multi_gpu --num_processes N ...] -m dpo_engine.stages.rank SPEC

Every rank (:mod:`dpo_engine.stages.rank`) joins the process group through accelerate's
``PartialState`` (gloo on the CPU, NCCL on GPUs, one GPU per rank) and runs the same stage function:

- precompute: each rank computes its share of every missing cache shard; rank 0 gathers the shares
  and writes the shards (``dpo_engine.reference.shard_across_ranks``);
- train: every rank trains on its share of each step's pairs (gradients summed over ranks, see
  ``dpo_engine.training``); rank 0 alone logs to MLflow, writes checkpoints, exports the model and
  records the stage result, which it writes to ``<run>/<stage>/launch/result.json`` for the launcher.
  With an FSDP accelerate config (``distributed_type: FSDP``) the trainer shards the policy with
  FSDP2's ``fully_shard`` (``dpo_engine.training.fsdp_settings``) instead of replicating it.

A rank that fails writes ``error-rank<R>.json``; the launcher re-raises the first one (a user error
stays a one-line user error) or reports the exit status.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from data_contracts.config import ConfigError, RunConfig
from data_contracts.errors import USER_ERROR_NAMES, DataError, DataPolicyError
from dpo_engine.modeling import ModelError
from dpo_engine.reference import CacheError
from dpo_engine.training import TrainingError

WORKER_ENV = "DPO_LAUNCH_WORKER"  # set in every launched rank: the stages run there, not launch again


class LaunchError(RuntimeError):
    """A launched stage failed without a user error (a crash): the exit status and where to look."""


# a rank's error of these classes is raised again as such in the launcher (user errors stay one line)
KNOWN_ERRORS = (ConfigError, DataError, DataPolicyError, ModelError, CacheError, TrainingError)


def in_worker() -> bool:
    return os.environ.get(WORKER_ENV) == "1"


def wants_launch(cfg: RunConfig) -> bool:
    """True when this stage call must go through ``accelerate launch`` (and is not a launched rank)."""
    return (cfg.train.num_processes > 1 or cfg.train.accelerate_config is not None) and not in_worker()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def accelerate_config(cfg: RunConfig) -> tuple[Path | None, dict]:
    if cfg.train.accelerate_config is None:
        return None, {}
    path = Path(cfg.train.accelerate_config).expanduser()
    if not path.is_file():
        raise ConfigError(f"config error: train.accelerate_config: file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"config error: train.accelerate_config: {path} is not valid YAML: "
                          f"{str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config error: train.accelerate_config: {path} must hold a mapping")
    return path.resolve(), data


def launch_command(cfg: RunConfig, spec: Path) -> list[str]:
    """The ``accelerate launch`` command line for one launched stage."""
    config_file, conf = accelerate_config(cfg)
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if config_file is not None:
        cmd += ["--config_file", str(config_file)]
        if cfg.train.num_processes > 1:
            cmd += ["--num_processes", str(cfg.train.num_processes)]
    else:  # torchrun on this machine: --multi_gpu is accelerate's torchrun path, on the CPU too
        n = cfg.train.num_processes
        cmd += ["--multi_gpu", "--num_processes", str(n), "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]
        if not torch.cuda.is_available():
            cmd += ["--num_cpu_threads_per_process", str(max(1, (os.cpu_count() or 1) // n))]
    if int(conf.get("num_machines") or 1) <= 1 and not conf.get("main_process_port"):
        cmd += ["--main_process_port", str(_free_port())]  # concurrent runs on one machine
    return cmd + ["-m", "dpo_engine.stages.rank", str(spec)]


def launch_stage(stage: str, cfg: RunConfig, run_dir: Path, *inputs: dict) -> dict:
    """Run ``stages.<stage>.run(cfg, run_dir, *inputs)`` in every launched rank; rank 0's result."""
    folder = Path(run_dir) / stage / "launch"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    spec = folder / "spec.json"
    spec.write_text(json.dumps({"stage": stage, "run_dir": str(Path(run_dir).resolve()),
                                "config": cfg.model_dump(mode="json"), "inputs": list(inputs)},
                               default=str))
    cmd = launch_command(cfg, spec)
    print(f"{stage}: launching {' '.join(cmd[1:])}", flush=True)
    env = {**os.environ, WORKER_ENV: "1"}
    root = str(Path(__file__).resolve().parents[2])  # the ranks import this checkout's packages
    env["PYTHONPATH"] = os.pathsep.join([root] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    proc = subprocess.run(cmd, env=env)
    result = folder / "result.json"
    if result.is_file():  # rank 0 finished and recorded the stage (another rank's late exit is moot)
        return json.loads(result.read_text())
    errors = sorted(folder.glob("error-rank*.json"))
    if errors:
        _reraise(json.loads(errors[0].read_text()), stage)
    raise LaunchError(f"{stage}: accelerate launch exited with status {proc.returncode} "
                      f"without a result; see the ranks' output above")


def _reraise(err: dict, stage: str):
    """The rank's exception again, as its own class when it is one of ours (user errors stay such)."""
    message = f"{err['message']} (rank {err['rank']} of the launched {stage} stage)"
    known = {c.__name__: c for c in KNOWN_ERRORS}
    if err["type"] in known:
        raise known[err["type"]](message)
    if err["type"] in USER_ERROR_NAMES:
        raise type(err["type"], (RuntimeError,), {})(message)
    raise LaunchError(f"{err['type']}: {message}")
