"""A sweep with every stage faked, for tests of the sweep's composition (threads, failures, what the
UI shows) that need no training."""

from __future__ import annotations


def fake_sweep(monkeypatch, fail: set[int], values: dict[int, float]):
    """flows.sweep.run_sweep with every stage faked (a variant in ``fail`` raises, the others score
    ``values[index]`` of eval/win_rate): records the threads variants ran on and what was registered."""
    import threading
    import time
    from types import SimpleNamespace

    import flows.sweep as fs
    from data_contracts.config import load_config

    seen = {"threads": set(), "registered": []}

    def variant(index, cfg, variant, run_dir, precomputed, parent, validated, stop, board):
        seen["threads"].add(threading.get_ident())
        time.sleep(0.3)
        if index in fail:
            raise RuntimeError(f"variant {index} broke")
        return {"cfg": cfg, "variant": variant, "run_dir": run_dir, "precomputed": precomputed,
                "trained": {"mlflow_run_id": f"run{index}", "steps": 1}, "stop_reason": None,
                "evaluated": {"metrics": {"eval/win_rate": values[index]}}, "ran_on": "here"}

    monkeypatch.setattr(fs, "train_and_evaluate", variant)
    monkeypatch.setattr(fs.t, "validate", lambda cfg, d: {})
    monkeypatch.setattr(fs.t, "precompute", lambda cfg, d, v: {})
    monkeypatch.setattr(fs, "STAGE", {"precompute": SimpleNamespace(key=lambda cfg, up: "k")})
    monkeypatch.setattr(fs.t, "register", lambda cfg, d, v, tr, ev: seen["registered"].append(tr["mlflow_run_id"])
                        or {"model_name": "m", "version": 1, "summary": "registered"})
    monkeypatch.setattr(fs.sw, "open_parent", lambda *a, **k: "parent")
    monkeypatch.setattr(fs.sw, "close_parent", lambda *a, **k: None)
    monkeypatch.setattr(fs.plan, "variant_configs",
                        lambda config, overrides, name, variants, stop:
                        (load_config(None, {"run_name": name}), [load_config()] * len(variants)))
    return seen
