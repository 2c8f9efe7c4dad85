"""Drill 3 (RELIABILITY.md): two `dpo run`s started at once on one state home (one reference
cache, one MLflow store, one Prefect database) both finish, overlapping in time; the shared reference
cache is computed exactly once (the second run waits on its lock and reads it), and reads back
verified."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

from test_reliability_crash import ROOT, _env, write_config
from tiny import tiny_model_dir


def test_two_flows_at_once_share_cache_and_store(tmp_path):
    from dpo_engine.reference import COMPLETE, read_cache

    model = tiny_model_dir(tmp_path / "tiny")
    home = tmp_path / "home"
    config = write_config(tmp_path / "run.yaml", model, registry={"model_name": "tiny-concurrent"})
    t0 = time.time()
    # no --run-name: both pick the same time-stamped name; each must still get its own folder
    procs = [subprocess.Popen([sys.executable, "-m", "flows.cli", "run", "--config", str(config)],
                              cwd=ROOT, env=_env(home), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True) for _ in range(2)]
    outs = [p.communicate(timeout=400) for p in procs]
    wall = time.time() - t0
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out[-1500:] + "\n---\n" + err[-3000:]
    run_dirs = [Path(re.search(r"run folder:\s+(\S+)", out).group(1)) for out, _ in outs]
    assert run_dirs[0] != run_dirs[1]
    summaries = [json.loads((d / "summary.json").read_text()) for d in run_dirs]
    assert all(s["status"] == "completed" for s in summaries)

    # the shared cache: one folder per split, each complete and verified against its key and the
    # validated example ids
    folders = sorted(p.parent for p in (home / "cache" / "reference").glob(f"*/{COMPLETE}"))
    assert len(folders) == 2
    validated = json.loads((run_dirs[0] / "validate.json").read_text())  # maybe the other run's folder
    valid = {s: pd.read_parquet(validated[s]["valid"]) for s in ("train", "eval")}
    for folder in folders:
        meta = json.loads((folder / COMPLETE).read_text())
        df = read_cache(folder, expect_ids=valid[meta["split"]]["example_id"].tolist(), expect_key=folder.name)
        assert df["ref_chosen_logps"].notna().all() and df["ref_rejected_logps"].notna().all()
    assert not list((home / "cache" / "reference").glob("*/.*tmp*"))  # no half-written shard left
    # a run that computed (not one that reused the other's result) says how many pairs it computed
    pairs = sum(len(v) for v in valid.values())
    results = [json.loads((d / "precompute.json").read_text()) for d in run_dirs]
    computed = [0 if r.get("reused") or r["run_dir"] != str(d) else r["computed_examples"]
                for r, d in zip(results, run_dirs)]
    assert sum(computed) == pairs, computed  # exactly once: the other run read it
    # the two runs overlapped: each one's folder (its config.yaml, written first) was made before the
    # other's summary.json (written last)
    spans = [((d / "config.yaml").stat().st_mtime, (d / "summary.json").stat().st_mtime) for d in run_dirs]
    assert max(s for s, _ in spans) < min(e for _, e in spans), spans

    # one MLflow store: each MLflow run registered at most once, the model has a version per run
    from mlflow import MlflowClient

    from dpo_engine import tracking as registry

    registry.connect(f"sqlite:///{home / 'mlflow' / 'mlflow.db'}")
    versions = MlflowClient().search_model_versions("name = 'tiny-concurrent'")
    run_ids = [v.run_id for v in versions]
    assert len(run_ids) == len(set(run_ids)) >= 1
    assert {s["mlflow_run_id"] for s in summaries} == set(run_ids)
    assert {s["registered_version"] for s in summaries} == {int(v.version) for v in versions}
    print(f"two concurrent runs: {wall:.1f}s, reference pairs computed per run {computed}, "
          f"model versions {sorted(int(v.version) for v in versions)}")
