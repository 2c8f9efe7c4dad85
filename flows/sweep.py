"""A grid sweep inside the ``dpo`` flow (deployment ``sweep``): validate once, precompute once per
reference key, train + evaluate each variant as a child MLflow run, register only the best.

Variants run one after another (``parallel=1``: one GPU), or ``parallel=N`` at a time: each
variant's train + evaluate is a Prefect task submitted to the flow's thread-pool task runner that
holds one slot of the global concurrency limit ``dpo-train`` (created or resized to N slots), so
the limit bounds the sweep's variants, and those of any other flow run using the same limit.

With ``workers=True`` the variants run on Prefect task workers instead (``dpo sweep-worker``, each
serving :data:`remote_variant_task`: e.g. one per GPU, or on other machines): each variant is a
background task run (``Task.delay``) that a worker picks up, still holding a slot of ``dpo-train``
(``parallel`` slots). Workers need the same state home (run folders, reference cache, the early-stop
board: one machine or a shared file system), the same MLflow store and Prefect API, and read/write
the task parameters and results through Prefect's result storage (under the state home by default).

With ``stop_margin`` a variant whose periodic eval metric (``train.eval_steps``) falls behind the
best value of any variant at the same step by more than the margin stops there (see
dpo_engine/sweep.py): it keeps its last checkpoint and weights, is not evaluated, is tagged
``dpo.sweep.status = stopped early (lagging: ...)`` and is never chosen unless every variant stopped.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from data_contracts.config import ConfigError, load_config
from dpo_engine import stages
from dpo_engine import sweep as sw
from dpo_engine.pipeline import new_run_dir, preflight
from data_contracts.helpers import write_json
from tasks import stages as t

CONCURRENCY_LIMIT = "dpo-train"  # Prefect global concurrency limit: slots = parallel variants


def run_sweep(config: str | None, overrides: dict[str, Any] | None, run_name: str | None,
              grid: dict[str, list] | list[dict[str, Any]], metric: str, parallel: int = 1, stop_margin: float | None = None,
              stop_metric: str | None = None, stop_mode: str | None = None, workers: bool = False,
              worker_wait_s: float = 600.0) -> dict:
    variants = sw.expand_grid(grid)
    parallel = check_parallel(parallel)
    stop = sw.stop_options(stop_margin, stop_metric, stop_mode)
    name = run_name or "sweep-" + dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    cfgs = [load_config(config, {**(overrides or {}), **v, "run_name": f"{name}-{i:02d}"})
            for i, v in enumerate(variants)]
    if stop:
        sw.check_stop_configs(cfgs)
    base = load_config(config, {**(overrides or {}), "run_name": name})
    for cfg in [base, *cfgs]:  # a variant may name its own files (reference.model_path, ...)
        preflight(cfg)
    sweep_dir = str(new_run_dir(base))
    parent = sw.open_parent(base, name, grid, metric, {"parallel": parallel, **(stop or {})})
    board = Path(sweep_dir) / sw.BOARD if stop else None

    validated = t.validate(base, sweep_dir)
    precomputed: dict[str, dict] = {}
    jobs = []
    for i, (cfg, variant) in enumerate(zip(cfgs, variants)):
        run_dir = str(new_run_dir(cfg))
        pkey = stages.precompute.key(cfg, validated)
        if pkey not in precomputed:
            precomputed[pkey] = t.precompute(cfg, sweep_dir, validated)
        if stop:
            sw.write_stop_spec(run_dir, board, f"{i:02d}", stop)
        jobs.append({"index": i, "cfg": cfg, "variant": variant, "run_dir": run_dir,
                     "precomputed": precomputed[pkey]})
    common = {"parent": parent, "validated": validated, "stop": stop, "board": board}

    if workers:  # background task runs picked up by `dpo sweep-worker` processes
        from prefect.futures import wait

        ensure_concurrency_limit(CONCURRENCY_LIMIT, parallel)
        wait_for_task_workers(remote_variant_task.task_key, worker_wait_s)
        futures = [remote_variant_task.delay(**job, **common, limit=CONCURRENCY_LIMIT) for job in jobs]
        wait(futures)  # every variant finishes (or fails) before the first failure is raised
        rows = [f.result() for f in futures]
    elif parallel == 1 or len(jobs) == 1:
        rows = [train_and_evaluate(**job, **common) for job in jobs]
    else:
        from prefect.futures import wait

        ensure_concurrency_limit(CONCURRENCY_LIMIT, parallel)
        futures = [variant_task.with_options(task_run_name=f"variant-{job['index']:02d}")
                   .submit(**job, **common, limit=CONCURRENCY_LIMIT) for job in jobs]
        wait(futures)  # every variant finishes (or fails) before the first failure is raised
        rows = [f.result() for f in futures]

    running = [i for i, r in enumerate(rows) if not r["stop_reason"]]
    if not running:  # every variant was stopped: evaluate them all and pick among them
        for r in rows:
            r["evaluated"] = t.evaluate(r["cfg"], r["run_dir"], validated, r["precomputed"], r["trained"])
        running = list(range(len(rows)))
    metrics = [r["evaluated"]["metrics"] if r["evaluated"] else {} for r in rows]
    best = sw.best_index(metrics, metric, among=running)
    winner = rows[best]
    registered = t.register(winner["cfg"], winner["run_dir"], validated, winner["trained"],
                            winner["evaluated"])
    value = winner["evaluated"]["metrics"][metric]
    sw.close_parent(parent, [r["trained"]["mlflow_run_id"] for r in rows], best, metric, value)
    summary = {
        "run_dir": sweep_dir, "status": "completed", "mlflow_parent_run_id": parent, "metric": metric,
        "parallel": parallel, "workers": workers, **(stop or {}), "board": str(board) if board else None,
        "precomputes": len(precomputed), "best": best, "best_value": value,
        "variants": [{"overrides": r["variant"], "run_dir": r["run_dir"],
                      "mlflow_run_id": r["trained"]["mlflow_run_id"], "steps": r["trained"]["steps"],
                      "status": r["stop_reason"] or "completed", "ran_on": r["ran_on"],
                      metric: m.get(metric)} for r, m in zip(rows, metrics)],
        "registered_model": registered.get("model_name"), "registered_version": registered.get("version"),
        "aliases": registered.get("aliases"), "gate_passed": registered.get("gate_passed"),
    }
    write_json(Path(sweep_dir) / "summary.json", summary)
    n_stopped = sum(1 for r in rows if r["stop_reason"])
    print(f"sweep: best of {len(rows)} by {metric}: variant {best} {winner['variant']} ({value:.4g})"
          f"{f'; {n_stopped} stopped early' if n_stopped else ''}; {registered.get('summary', '')}")
    return summary


def check_parallel(parallel) -> int:
    if isinstance(parallel, bool) or not isinstance(parallel, int) or parallel < 1:
        raise ConfigError(f"sweep: parallel must be a whole number >= 1 (got {parallel!r})")
    return parallel


def train_and_evaluate(index: int, cfg, variant: dict, run_dir: str, precomputed: dict, parent: str,
                       validated: dict, stop: dict | None, board: Path | None) -> dict:
    """One variant: train (stopped early when it lags), join the parent run, evaluate unless stopped."""
    trained = t.train(cfg, run_dir, validated, precomputed)
    reason = trained.get("stop_reason")
    if stop and not reason:  # a reused training posted nothing while it ran: the board gets its history
        history = json.loads(Path(trained["history"]).read_text())
        sw.Board(board).post(f"{index:02d}", sw.eval_points(history, stop["stop_metric"]))
    sw.adopt(parent, trained["mlflow_run_id"], variant, status=reason or "completed")
    evaluated = None if reason else t.evaluate(cfg, run_dir, validated, precomputed, trained)
    return {"cfg": cfg, "variant": variant, "run_dir": run_dir, "precomputed": precomputed,
            "trained": trained, "evaluated": evaluated, "stop_reason": reason,
            "ran_on": f"{socket.gethostname()}:{os.getpid()}"}


@task(name="sweep-variant", cache_policy=NO_CACHE, persist_result=False, log_prints=True)
def variant_task(index: int, cfg, variant: dict, run_dir: str, precomputed: dict, parent: str,
                 validated: dict, stop: dict | None, board: Path | None, limit: str) -> dict:
    """``train_and_evaluate`` holding one slot of the global concurrency limit ``limit``."""
    from prefect.concurrency.sync import concurrency

    with concurrency(limit, occupy=1, strict=True):
        return train_and_evaluate(index, cfg, variant, run_dir, precomputed, parent, validated, stop,
                                  board)


# What `dpo sweep-worker` serves: the same task, its result persisted (the flow reads it back
# from Prefect's result storage, since it ran in another process).
remote_variant_task = variant_task.with_options(name="sweep-variant-remote", persist_result=True)


def task_workers(task_key: str) -> int:
    """How many task workers the Prefect API knows serving ``task_key``."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        resp = client.request("POST", "/task_workers/filter",
                              json={"task_worker_filter": {"task_keys": [task_key]}})
    return len(resp.json())


def wait_for_task_workers(task_key: str, timeout_s: float) -> int:
    """Wait up to ``timeout_s`` for a task worker serving ``task_key``; ConfigError if none comes."""
    import time

    deadline, said = time.monotonic() + timeout_s, False
    while True:
        n = task_workers(task_key)
        if n:
            print(f"sweep: {n} task worker(s) serve the variants")
            return n
        if time.monotonic() >= deadline:
            raise ConfigError(f"sweep: no task worker served the sweep variants within {timeout_s:.0f}s; "
                              "start one per GPU or machine with `dpo sweep-worker` (same PREFECT_API_URL "
                              "and DPO_HOME), or run without --workers")
        if not said:
            print("sweep: waiting for a task worker (`dpo sweep-worker`) to serve the variants")
            said = True
        time.sleep(2.0)


def serve_variants(limit: int = 1) -> None:
    """Run a task worker for sweep variants (``dpo sweep-worker``): ``limit`` at a time."""
    from prefect.task_worker import serve

    serve(remote_variant_task, limit=limit)


def ensure_concurrency_limit(name: str, slots: int) -> None:
    """Create the global concurrency limit ``name`` with ``slots`` slots, or resize it."""
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, slots)
