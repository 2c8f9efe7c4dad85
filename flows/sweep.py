"""The grid sweep, its own flow ``dpo-sweep`` (deployment ``dpo-sweep/sweep``, ``dpo sweep``): validate
once, precompute once per reference key, train + evaluate each variant as a child MLflow run, register
only the best. The flow run is named after the sweep folder and publishes a leaderboard table
artifact (``dpo-sweep-leaderboard``). This module is the Prefect composition (tasks, concurrency,
task workers); what a sweep is (variants, stop rule, winner, summary) lives in :mod:`dpo_engine.sweep`.

Variants run one after another (``parallel=1``: one GPU), or ``parallel=N`` at a time: each
variant's train + evaluate is a Prefect task submitted to a thread-pool task runner of N threads
that holds one slot of the global concurrency limit ``dpo-train`` (created or resized to N slots), so
the limit bounds the sweep's variants, and those of any other flow run using the same limit.
A variant that fails is reported (its row in ``summary.json`` has ``status: failed`` and the
error) and the best of the others is still registered; the sweep fails only when every variant did.

With ``workers=True`` the variants run on Prefect task workers instead (``dpo sweep-worker``, each
serving :data:`remote_variant_task`: e.g. one per GPU, or on other machines): each variant is a
background task run (``Task.delay``) that a worker picks up, still holding a slot of ``dpo-train``
(``parallel`` slots). Workers need the same state home (run folders, reference cache, the early-stop
board: one machine or a shared file system), the same MLflow store and Prefect API, and read/write
the task parameters and results through Prefect's result storage (under the state home by default).

With ``stop_margin`` a variant whose periodic eval metric (``train.eval_steps``) falls behind the
best value of any variant at the same step by more than the margin stops there (see
dpo_engine/sweep/early_stop.py): it keeps its last checkpoint and weights, is not evaluated, is tagged
``dpo.sweep.status = stopped early (lagging: ...)`` and is never chosen unless every variant stopped.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Literal

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import concurrency
from prefect.futures import wait
from prefect.task_runners import ThreadPoolTaskRunner
from prefect.task_worker import serve

from data_contracts.config import ConfigError
from data_contracts.helpers import redact_credentials, write_json
from dpo_engine import sweep as sw
from dpo_engine.pipeline import new_run_dir
from dpo_engine.stages.table import STAGE
from dpo_engine.sweep import plan
from tasks import artifacts, results
from tasks import stages as t
from tasks.run_names import name_flow_run

CONCURRENCY_LIMIT = "dpo-train"  # Prefect global concurrency limit: slots = parallel variants


def run_sweep(config: str | None, overrides: dict[str, Any] | None, run_name: str | None,
              grid: dict[str, list] | list[dict[str, Any]], metric: str, parallel: int = 1, stop_margin: float | None = None,
              stop_metric: str | None = None, stop_mode: str | None = None, workers: bool = False,
              worker_wait_s: float = 600.0) -> dict:
    variants = sw.expand_grid(grid)
    parallel = sw.check_parallel(parallel)
    stop = sw.stop_options(stop_margin, stop_metric, stop_mode)
    name = plan.sweep_name(run_name)
    base, cfgs = plan.variant_configs(config, overrides, name, variants, stop)
    sweep_dir = str(new_run_dir(base))
    name_flow_run(Path(sweep_dir).name)
    parent = sw.open_parent(base, name, grid, metric, {"parallel": parallel, **(stop or {})})
    board = Path(sweep_dir) / sw.BOARD if stop else None

    validated = t.validate(base, sweep_dir)
    precomputed: dict[str, dict] = {}
    jobs = []
    for i, (cfg, variant) in enumerate(zip(cfgs, variants)):
        run_dir = str(new_run_dir(cfg))
        pkey = STAGE["precompute"].key(cfg, {"validate": validated})
        if pkey not in precomputed:
            precomputed[pkey] = t.precompute(cfg, sweep_dir, validated)
        if stop:
            sw.write_stop_spec(run_dir, board, f"{i:02d}", stop)
        jobs.append({"index": i, "cfg": cfg, "variant": variant, "run_dir": run_dir,
                     "precomputed": precomputed[pkey]})
    common = {"parent": parent, "validated": validated, "stop": stop, "board": board}

    if workers:  # background task runs picked up by `dpo sweep-worker` processes
        ensure_concurrency_limit(CONCURRENCY_LIMIT, parallel)
        wait_for_task_workers(remote_variant_task.task_key, worker_wait_s)
        futures = [remote_variant_task.delay(**job, **common, limit=CONCURRENCY_LIMIT) for job in jobs]
        wait(futures)  # every variant finishes (or fails)
        rows = [_outcome(job, f.result) for job, f in zip(jobs, futures)]
    elif parallel == 1 or len(jobs) == 1:
        rows = [_outcome(job, lambda job=job: train_and_evaluate(**job, **common)) for job in jobs]
    else:
        ensure_concurrency_limit(CONCURRENCY_LIMIT, parallel)
        # at most `parallel` variant threads (each also holds a slot of the concurrency limit)
        with ThreadPoolTaskRunner(max_workers=parallel) as runner:
            futures = [runner.submit(variant_task.with_options(task_run_name=f"variant-{job['index']:02d}"),
                                     parameters={**job, **common, "limit": CONCURRENCY_LIMIT}) for job in jobs]
            wait(futures)  # every variant finishes (or fails)
            rows = [_outcome(job, f.result) for job, f in zip(jobs, futures)]
    failed = [r for r in rows if r.get("error")]
    if len(failed) == len(rows):  # nothing to choose from: the first failure is the sweep's
        raise failed[0]["exception"]
    for r in failed:
        print(f"sweep: variant {r['index']:02d} {r['variant']} failed ({r['error']}); the best of the "
              "others is registered")

    among, to_evaluate = plan.candidates(rows)
    for i in to_evaluate:  # every variant was stopped early: evaluate them all and pick among them
        r = rows[i]
        r["evaluated"] = t.evaluate(r["cfg"], r["run_dir"], validated, r["precomputed"], r["trained"])
    best = sw.best_index([r["evaluated"]["metrics"] if r["evaluated"] else {} for r in rows], metric, among=among)
    winner = rows[best]
    registered = t.register(winner["cfg"], winner["run_dir"], validated, winner["trained"],
                            winner["evaluated"])
    summary = plan.summary(sweep_dir, rows, best, metric, parent=parent, parallel=parallel, workers=workers,
                           stop=stop, board=board, precomputes=len(precomputed), registered=registered)
    sw.close_parent(parent, [r["trained"]["mlflow_run_id"] for r in rows if r["trained"]], best, metric,
                    summary["best_value"])
    write_json(Path(sweep_dir) / "summary.json", summary)
    artifacts.publish_leaderboard(summary)
    print(plan.summary_line(summary, rows, registered))
    return summary


@flow(name="dpo-sweep", log_prints=True)
def dpo_sweep(grid: dict[str, list[Any]] | list[dict[str, Any]], metric: str = "eval/win_rate",
              parallel: int = 1, stop_margin: float | None = None, stop_metric: str | None = None,
              stop_mode: Literal["max", "min"] | None = None, workers: bool = False,
              config: str | None = None, overrides: dict[str, Any] | None = None,
              run_name: str | None = None) -> dict:
    """A grid sweep: each variant trained and evaluated as a child MLflow run of one parent, only
    the best by ``metric`` registered; ``summary.json`` in the sweep folder, the leaderboard as an artifact.

    Args:
        grid: A mapping tries every combination ({"loss.beta": [0.1, 0.3], "loss.loss_type": ["sigmoid", "ipo"]});
            a list tries exactly those variants ([{"loss.beta": 0.1}, {"loss.beta": 0.3, "loss.loss_type": "ipo"}]).
        metric: The evaluation metric that picks the best variant (higher is better), e.g. eval/win_rate.
        parallel: Variants trained and evaluated at a time (Prefect global concurrency limit dpo-train).
        stop_margin: Stop a variant whose stop_metric lags the best variant's at a train.eval_steps
            checkpoint by more than this; empty: never (needs overrides {"train.eval_steps": N}).
        stop_metric: The periodic eval metric the stop rule compares; empty: eval/rewards/accuracies.
        stop_mode: max (higher is better) or min; empty: from the metric (min for losses).
        workers: Run the variants on Prefect task workers (`dpo sweep-worker`, one per GPU or machine)
            instead of in this flow's process.
        config: A run config YAML file (path on the machine that runs the flow); empty: the built-in defaults.
        overrides: Config fields every variant shares, e.g. {"train.max_steps": 200}.
        run_name: The sweep folder's name (variants are <name>-00, <name>-01, ...); empty: generated.
    """
    return run_sweep(config, overrides, run_name, grid, metric, parallel=parallel, stop_margin=stop_margin,
                     stop_metric=stop_metric, stop_mode=stop_mode, workers=workers)


def _outcome(job: dict, result) -> dict:
    """The row of a variant: ``result()`` (its train_and_evaluate row), or, when that raises, a failed
    row naming the error (a user interrupt still stops the sweep)."""
    try:
        return {"index": job["index"], **result()}
    except Exception as e:  # noqa: BLE001 - one variant's failure is reported, not the sweep's end
        return {"index": job["index"], "cfg": job["cfg"], "variant": job["variant"], "run_dir": job["run_dir"],
                "precomputed": job["precomputed"], "trained": None, "evaluated": None, "stop_reason": None,
                "ran_on": None, "error": redact_credentials(f"{type(e).__name__}: {e}")[:500], "exception": e}


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
            "ran_on": plan.where()}


@task(name="sweep-variant", cache_policy=NO_CACHE, persist_result=False, log_prints=True)
def variant_task(index: int, cfg, variant: dict, run_dir: str, precomputed: dict, parent: str,
                 validated: dict, stop: dict | None, board: Path | None, limit: str) -> dict:
    """``train_and_evaluate`` holding one slot of the global concurrency limit ``limit``."""
    with concurrency(limit, occupy=1, strict=True):
        return train_and_evaluate(index, cfg, variant, run_dir, precomputed, parent, validated, stop,
                                  board)


# What `dpo sweep-worker` serves: the same task, its result persisted (the flow reads it back
# from Prefect's result storage, since it ran in another process).
remote_variant_task = variant_task.with_options(name="sweep-variant-remote", persist_result=True,
                                                result_serializer=results.SERIALIZER)


def task_workers(task_key: str) -> int:
    """How many task workers the Prefect API knows serving ``task_key``."""
    with get_client(sync_client=True) as client:
        resp = client.request("POST", "/task_workers/filter",
                              json={"task_worker_filter": {"task_keys": [task_key]}})
    return len(resp.json())


def wait_for_task_workers(task_key: str, timeout_s: float) -> int:
    """Wait up to ``timeout_s`` for a task worker serving ``task_key``; ConfigError if none comes."""
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
    serve(remote_variant_task, limit=limit)


def ensure_concurrency_limit(name: str, slots: int) -> None:
    """Create the global concurrency limit ``name`` with ``slots`` slots, or resize it."""
    with get_client(sync_client=True) as client:
        client.upsert_global_concurrency_limit_by_name(name, slots)
