"""One rank of a launched stage (``accelerate launch ... -m dpo_engine.stages.rank SPEC``, see
:mod:`dpo_engine.stages.launch`): it joins the process group and runs exactly the stage function a
single process runs, on the inputs in SPEC. Rank 0's result goes to ``result.json`` beside SPEC, a
rank's error to ``error-rank<R>.json``."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState

from data_contracts.config import ConfigError, RunConfig
from data_contracts.errors import user_error
from data_contracts.helpers import write_json
from dpo_engine.stages.launch import WORKER_ENV
from dpo_engine.stages.table import STAGE

LAUNCHED = ("precompute", "train")  # the stages that split their work over ranks


def run_rank(spec: dict) -> dict:
    """This rank's part of the launched stage: the stage's own ``run``; rank 0 returns its result."""
    if spec["stage"] not in LAUNCHED:
        raise ConfigError(f"config error: the {spec['stage']} stage does not run under accelerate launch")
    cfg = RunConfig.model_validate(spec["config"])
    return STAGE[spec["stage"]].module.run(cfg, Path(spec["run_dir"]), *spec["inputs"])


def main(argv: list[str] | None = None) -> int:
    spec_path = Path((argv if argv is not None else sys.argv[1:])[0])
    os.environ[WORKER_ENV] = "1"
    state = PartialState(cpu=not torch.cuda.is_available())  # joins the process group (torchrun env)
    rank = state.process_index
    try:
        result = run_rank(json.loads(spec_path.read_text()))
        if state.is_main_process:
            write_json(spec_path.with_name("result.json"), result, indent=None)
    except BaseException as e:
        err = user_error(e) or e
        write_json(spec_path.with_name(f"error-rank{rank}.json"),
                   {"rank": rank, "type": type(err).__name__, "message": str(err).strip().splitlines()[0]
                    if str(err).strip() else type(err).__name__}, indent=None)
        if user_error(e) is not None:
            print(f"error (rank {rank}): {err}", file=sys.stderr)
            return 1
        raise
    finally:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
