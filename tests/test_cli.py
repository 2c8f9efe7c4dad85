"""The dpo command line: help texts, and user errors as one line with a non-zero exit."""

import os
import subprocess
import sys

import pytest

from data_contracts.config import ConfigError, load_config


def dpo(*args, env_extra=None, timeout=120):
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout)


def test_help_explains_every_command():
    out = dpo("--help")
    assert out.returncode == 0
    for cmd in ("run", "validate", "precompute", "train", "evaluate", "register", "serve", "compare", "sweep",
                "sweep-worker", "config"):
        assert cmd in out.stdout
        sub = dpo(cmd, "--help")
        assert sub.returncode == 0 and "usage: dpo " + cmd in sub.stdout


@pytest.mark.parametrize("args, needle", [
    (["--set", "train.learning_rate=fast"], "train.learning_rate"),
    (["--set", "train.no_such_field=1"], "train.no_such_field: unknown field"),
    (["--config", "/nonexistent/run.yaml"], "/nonexistent/run.yaml"),
    (["--set", "data.source=/nonexistent/data.jsonl"], "data.source: file not found"),
    (["--set", "tracking.mlflow_tracking_uri=http://127.0.0.1:9"], "cannot reach MLflow"),
    (["--set", "eval.judge=no.such.module:fn"], "eval.judge"),
])
def test_user_errors_print_one_line_and_exit_nonzero(dpo_home, args, needle):
    out = dpo("run", *args)
    assert out.returncode == 1
    lines = [l for l in out.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], out.stderr
    assert "Traceback" not in out.stderr


def test_usage_errors_keep_argparse_exit_2_and_the_config_may_be_positional(dpo_home, tmp_path):
    """Exit codes: 2 usage (argparse), 1 user error; `dpo run my.yaml` reads my.yaml as --config would."""
    assert dpo("run", "--no-such-option").returncode == 2
    both = dpo("run", "a.yaml", "--config", "b.yaml")
    assert both.returncode == 2 and "give one config, not CONFIG and --config" in both.stderr
    assert dpo("run", "a.yaml", "--trl-config", "b.yaml").returncode == 2
    bad = tmp_path / "my.yaml"
    bad.write_text("train:\n  learning_rate: fast\n")
    for args in (["run", str(bad)], ["sweep", str(bad), "--grid", "loss.beta=0.1,0.2"], ["compare", str(bad)]):
        out = dpo(*args)
        assert out.returncode == 1 and "train.learning_rate" in out.stderr and out.stderr.count("\n") == 1, out.stderr


def test_unreachable_prefect_api_is_one_line(dpo_home):
    out = dpo("run", env_extra={"PREFECT_API_URL": "http://127.0.0.1:9/api"})
    assert out.returncode == 1 and out.stderr.count("\n") == 1
    assert "cannot reach the Prefect API at http://127.0.0.1:9/api" in out.stderr


def test_validate_input_mode_exit_codes(dpo_home, tmp_path):
    import json
    from tiny import tiny_model_dir

    tok = tiny_model_dir(tmp_path / "tok")
    good = {"prompt": "Say hi.", "chosen": " Hi!", "rejected": " No."}
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in [good, {"prompt": "x", "chosen": "same", "rejected": "same"},
                                                       {"chosen": 3}]))
    out = dpo("validate", str(data), "--out", str(tmp_path / "o"), "--tokenizer", str(tok))
    assert out.returncode == 3, out.stderr  # the data failed its validation policy: its own exit code
    assert out.stderr.startswith("error: ") and "IDENTICAL_PAIR" in out.stderr and out.stderr.count("\n") == 1
    assert {p.name for p in (tmp_path / "o").iterdir()} >= {"valid.parquet", "rejects.parquet", "report.json"}
    ok = dpo("validate", str(data), "--out", str(tmp_path / "o2"), "--tokenizer", str(tok),
             "--set", "data.max_invalid_fraction=1.0")
    assert ok.returncode == 0 and "1/3 valid" in ok.stdout
    missing = dpo("validate", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "o3"), "--tokenizer", str(tok))
    assert missing.returncode == 1 and "nope.jsonl" in missing.stderr
    # a file with no usable pair fails even when the policy allows every row to be rejected
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in [{"chosen": 3}, {"prompt": "x", "chosen": "s", "rejected": "s"}]))
    none = dpo("validate", str(bad), "--out", str(tmp_path / "o4"), "--tokenizer", str(tok),
               "--set", "data.max_invalid_fraction=1.0")
    assert none.returncode == 3 and none.stderr.count("\n") == 1, none.stderr
    assert "0 of 2 rows valid" in none.stderr and "IDENTICAL_PAIR 1" in none.stderr


def test_config_overrides_and_errors(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("loss:\n  beta: 0.5\ntrain:\n  learning_rate: 2.0e-6\n")
    cfg = load_config(p, ["train.learning_rate=3e-6", "registry.gate.thresholds={eval/win_rate: 0.6}"])
    assert cfg.loss.beta == 0.5 and cfg.train.learning_rate == 3e-6
    assert cfg.registry.gate.thresholds == {"eval/win_rate": 0.6}
    d = load_config()
    assert (d.loss.beta, d.train.learning_rate, d.data.max_length, d.data.truncation_mode) == \
        (0.1, 1e-6, 1024, "keep_start")
    with pytest.raises(ConfigError, match="loss.beta"):
        load_config(None, ["loss.beta=-1"])
    with pytest.raises(ConfigError, match="data.truncation_mode"):
        load_config(None, {"data.truncation_mode": "middle"})


def test_stage_commands_need_earlier_results(dpo_home, tmp_path):
    out = dpo("train", "--run-dir", str(tmp_path / "r"))
    assert out.returncode == 1 and "dpo validate --run-dir" in out.stderr


def test_validate_input_mode_checks_every_row_with_trl_defaults(dpo_home, tmp_path):
    """`dpo validate FILE` checks the whole file with TRL's defaults (max_length 1024, no row limits),
    not the demo run's train/eval limits and max_length 256; --config opts into a run's settings."""
    import json
    from pathlib import Path

    from tiny import tiny_model_dir

    tok = tiny_model_dir(tmp_path / "tok")
    rows = [{"prompt": f"Question {i}: " + "tell me more " * 40, "chosen": f" Yes {i}.", "rejected": f" No {i}."}
            for i in range(100)]
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = dpo("validate", str(data), "--out", str(tmp_path / "all"), "--tokenizer", str(tok))
    assert out.returncode == 0, out.stderr
    assert "100/100 valid" in out.stdout and "max_length 1024" in out.stdout, out.stdout
    report = json.loads((tmp_path / "all" / "report.json").read_text())
    assert report["valid"] == 100 and report["limited_out"] == 0
    default = str(Path(__file__).resolve().parents[1] / "configs" / "default.yaml")
    run = dpo("validate", str(data), "--out", str(tmp_path / "run"), "--tokenizer", str(tok), "--config", default,
              "--set", "data.max_invalid_fraction=1.0")
    # the run's max_length 256 rejects every one of these prompts: a file with no usable pair fails
    assert run.returncode == 3 and "PROMPT_TOO_LONG 100" in run.stderr, run.stderr
    assert json.loads((tmp_path / "run" / "report.json").read_text())["valid"] == 0


def test_validate_input_mode_without_a_usable_model_asks_for_a_tokenizer(dpo_home, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    out = dpo("validate", str(data), "--out", str(tmp_path / "o"), "--set", "model.name_or_path=/nonexistent/model")
    assert out.returncode == 1 and out.stderr.count("\n") == 1, out.stderr
    assert "--tokenizer" in out.stderr and "/nonexistent/model" in out.stderr
