"""Reliability drill 7, security defaults: trust_remote_code off unless configured (and recorded),
safetensors only, torch.load with weights_only=True, local servers on 127.0.0.1, and no credential
from the environment in logs, MLflow params/tags/artifacts, run folders or Prefect state."""

import os
import re
from pathlib import Path

import pytest
import torch

from data_contracts.config import ConfigError, ModelConfig, load_config
from dpo_engine.models import ModelError, load_model, load_tokenizer
from tiny import tiny_model_dir

ROOT = Path(__file__).resolve().parents[1]
SESSION_HOME = Path(os.environ["DPO_HOME"])  # set by conftest before Prefect reads its settings
SOURCE_DIRS = ("data_contracts", "dpo_engine", "flows", "tasks", "scripts", "tests", "bench", "deployments")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("sec") / "m")


# ---------------------------------------------------------------- trust_remote_code

@pytest.mark.parametrize("configured", [None, False, True])
def test_trust_remote_code_follows_the_config_only(tiny, monkeypatch, configured):
    import transformers

    seen = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        real = cls.from_pretrained.__func__

        def spy(klass, *a, _real=real, _name=cls.__name__, **kw):
            seen.append((_name, kw.get("trust_remote_code", False), kw.get("use_safetensors")))
            return _real(klass, *a, **kw)
        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    cfg = ModelConfig(name_or_path=str(tiny), **({} if configured is None else
                                                {"trust_remote_code": configured}))
    load_tokenizer(cfg, str(tiny))
    load_model(cfg, str(tiny))
    assert {n for n, *_ in seen} == {"AutoModelForCausalLM", "AutoTokenizer"}
    assert all(trc is bool(configured) for _, trc, _ in seen), seen
    assert all(st is True for n, _, st in seen if n == "AutoModelForCausalLM")


@pytest.mark.parametrize("key", ["trust_remote_code", "use_safetensors"])
def test_init_kwargs_cannot_override_the_security_defaults(key):
    with pytest.raises(ConfigError, match=f"model.init_kwargs.*{key}"):
        load_config(None, {f"model.init_kwargs.{key}": key == "trust_remote_code"})


def test_other_loaders_hardcode_trust_remote_code_off():
    for f in ("dpo_engine/registry.py", "dpo_engine/evaluation.py"):
        text = (ROOT / f).read_text()
        assert "trust_remote_code=True" not in text
        for call in re.findall(r"AutoModel\w*\.from_pretrained\([^)]*\)", text, re.S):
            assert "trust_remote_code=False" in call and "use_safetensors=True" in call, (f, call)


# ---------------------------------------------------------------- safetensors only

def test_pickle_only_model_folder_is_refused(tiny, tmp_path):
    import shutil

    from safetensors.torch import load_file

    d = tmp_path / "pickled"
    shutil.copytree(tiny, d)
    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    with pytest.raises(ModelError, match=r"pytorch_model\.bin.*only safetensors") as err:
        load_model(ModelConfig(name_or_path=str(d)), str(d))
    assert "\n" not in str(err.value)


def test_torch_load_always_uses_weights_only():
    calls = []
    for folder in SOURCE_DIRS:
        for f in (ROOT / folder).rglob("*.py") if (ROOT / folder).is_dir() else []:
            text = f.read_text()
            for m in re.finditer(r"torch\.load\(", text):
                depth, i = 1, m.end()
                while depth and i < len(text):
                    depth += {"(": 1, ")": -1}.get(text[i], 0)
                    i += 1
                calls.append((f"{f.relative_to(ROOT)}:{text[:m.start()].count(chr(10)) + 1}",
                              text[m.start():i]))
    calls = [c for c in calls if "re.finditer" not in c[1]]
    assert calls, "expected at least the trainer's checkpoint load"
    bad = [where for where, call in calls if "weights_only=True" not in call]
    assert not bad, f"torch.load without weights_only=True: {bad}"


# ---------------------------------------------------------------- local servers

def test_servers_bind_localhost_only():
    import inspect

    from flows import cli

    src = inspect.getsource(cli.start_local_server)
    assert '"--host", "127.0.0.1"' in src and "0.0.0.0" not in src
    texts = {"README.md": (ROOT / "README.md").read_text()}
    texts.update({str(p.relative_to(ROOT)): p.read_text() for p in (ROOT / "scripts").glob("*.sh")})
    starts = 0
    for name, text in texts.items():
        assert "0.0.0.0" not in text, name
        for line in text.splitlines():
            if re.search(r"(prefect server start|mlflow (ui|server))", line) and not line.lstrip().startswith("#"):
                starts += 1
                assert "--host 127.0.0.1" in line, (name, line)
    assert starts >= 1


# ---------------------------------------------------------------- no credential leaks

PLANTED = {"AWS_SECRET_ACCESS_KEY": "sk-test-PLANTED-1234",
           "MLFLOW_TRACKING_PASSWORD": "mlflow-PLANTED-pw-5678",
           "HF_TOKEN": "hf_PLANTEDtoken9012",
           "PREFECT_API_KEY": "pnu_PLANTED3456",
           "OPENAI_API_KEY": "sk-PLANTED-openai-7890"}


def _files(*roots: Path):
    for root in roots:
        if root.is_dir():
            yield from (p for p in root.rglob("*") if p.is_file())


def test_no_planted_credential_leaks_into_outputs(tiny, dpo_home, monkeypatch, capfd):
    from data_contracts.config import mlflow_uri
    from dpo_engine import registry
    from flows.dpo import dpo
    from test_flow_e2e import _overrides

    for k, v in PLANTED.items():
        monkeypatch.setenv(k, v)
    summary = dpo(overrides=_overrides(tiny, **{"registry.model_name": "tiny-sec"}), run_name="sec")
    assert summary["status"] == "completed"
    out, err = capfd.readouterr()

    registry.connect(mlflow_uri())
    from mlflow import MlflowClient
    run = MlflowClient().get_run(summary["mlflow_run_id"])
    assert run.data.params["model.trust_remote_code"] == "False"
    recorded = [str(run.data.params), str(run.data.tags)]
    for mv in MlflowClient().search_model_versions("name='tiny-sec'"):
        recorded.append(str(mv.tags))

    secrets = [v.encode() for v in PLANTED.values()]
    leaks = [f"captured output: {s!r}" for s in secrets if s in (out + err).encode()]
    leaks += [f"mlflow params/tags: {s!r}" for s in secrets if s in "".join(recorded).encode()]
    n = 0
    prefect_home = Path(os.environ.get("PREFECT_HOME", SESSION_HOME / "prefect"))
    for f in _files(dpo_home, SESSION_HOME / "prefect", prefect_home):
        n += 1
        data = f.read_bytes()
        leaks += [f"{f}: {s!r}" for s in secrets if s in data]
    assert n > 20 and (dpo_home / "mlflow").is_dir()  # the run folder, MLflow store and artifacts
    assert not leaks, leaks
