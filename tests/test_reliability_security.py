"""Reliability drill 7, security defaults: trust_remote_code off unless configured (and recorded),
safetensors only, torch.load with weights_only=True, local servers on 127.0.0.1, and no credential
from the environment in logs, MLflow params/tags/artifacts, run folders or Prefect state."""

import os
import re
from pathlib import Path

import pytest
import torch

from data_contracts.config import ConfigError, ModelConfig, load_config
from dpo_engine.modeling import ModelError, load_model, load_tokenizer
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


def test_trust_remote_code_on_is_recorded(dpo_home, monkeypatch):
    """A run with model.trust_remote_code=true says so where it is recorded: the run folder's
    config.yaml and the train stage's MLflow params (``train.run`` logs ``logged_params`` through
    ``registry.log_params``, here into a stand-in client; the planted-credential test below reads
    the real params of a run with it off)."""
    from types import SimpleNamespace

    import yaml

    from dpo_engine import tracking as registry
    from dpo_engine.pipeline import new_run_dir
    from dpo_engine.tracking import client as tracking_client
    from dpo_engine.stages.train import logged_params

    cfg = load_config(None, {"model.trust_remote_code": True, "run_name": "trc"})
    run_dir = new_run_dir(cfg)
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["trust_remote_code"] is True
    sent = {}
    client = SimpleNamespace(get_run=lambda run_id: SimpleNamespace(data=SimpleNamespace(params={})),
                             log_batch=lambda run_id, params: sent.update({p.key: p.value for p in params}))
    monkeypatch.setattr(tracking_client, "mlflow_client", lambda: client)
    registry.log_params("run", logged_params(cfg))
    assert sent["model.trust_remote_code"] == "True"
    sent.clear()
    registry.log_params("run", logged_params(load_config(None, {})))
    assert sent["model.trust_remote_code"] == "False"


def test_other_loaders_hardcode_trust_remote_code_off():
    for f in [*sorted(str(p.relative_to(ROOT)) for p in (ROOT / "dpo_engine" / "tracking").glob("*.py")),
              "dpo_engine/evaluation/judges.py"]:
        text = (ROOT / f).read_text()
        assert "trust_remote_code=True" not in text
        # every call; a ``literal`` in a docstring (e.g. showing users how to load a folder) is not one
        for call in re.findall(r"(?<!``)AutoModel\w*\.from_pretrained\([^)]*\)", text, re.S):
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


def test_pickle_only_adapter_folder_is_refused(tiny, tmp_path, monkeypatch):
    """peft.adapter_path (continuing a saved adapter): adapter_model.safetensors only. A folder with
    adapter_model.bin alone is refused in one line naming it (at the config check and at load); with
    both, the pickle is never read."""
    import shutil

    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file

    from data_contracts.config import PeftConfig
    from dpo_engine.modeling import apply_adapter, check_config

    base = lambda: load_model(ModelConfig(name_or_path=str(tiny)), str(tiny))  # noqa: E731
    saved = tmp_path / "adapter"
    get_peft_model(base(), LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(saved)
    pickled = tmp_path / "pickled"
    shutil.copytree(saved, pickled)
    torch.save(load_file(pickled / "adapter_model.safetensors"), pickled / "adapter_model.bin")
    (pickled / "adapter_model.safetensors").unlink()
    with pytest.raises(ModelError) as err:
        apply_adapter(base(), PeftConfig(enabled=True, adapter_path=str(pickled)))
    msg = str(err.value)
    assert str(pickled) in msg and "adapter_model.bin" in msg and "convert" in msg and "safetensors" in msg, msg
    assert "\n" not in msg
    with pytest.raises(ConfigError, match=r"peft\.adapter_path: .*adapter_model\.bin.*only safetensors"):
        check_config(load_config(None, {"peft.enabled": True, "peft.adapter_path": str(pickled)}))

    (saved / "adapter_model.bin").write_bytes(b"a pickle that must not be read")
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    model = apply_adapter(base(), PeftConfig(enabled=True, adapter_path=str(saved)))
    assert any(p.requires_grad for p in model.parameters()) and not loads, loads


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

    from flows import prefect_server as cli

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
URL_PASSWORD = "PLANTED-url-pw-4321"  # inside an MLFLOW_TRACKING_URI-style URL


def _files(*roots: Path):
    for root in roots:
        if root.is_dir():
            yield from (p for p in root.rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def http_store(tmp_path_factory):
    """A real `mlflow server` (127.0.0.1), shared by this module's drills."""
    from test_reliability_mlflow import MlflowServer

    server = MlflowServer(tmp_path_factory.mktemp("mlflow-http"))
    server.start()
    yield server
    server.stop()


def test_no_planted_credential_leaks_into_outputs(tiny, dpo_home, monkeypatch, capfd, http_store):
    """A whole run against a real HTTP tracking server whose URI (from MLFLOW_TRACKING_URI) holds
    user:password, with secrets planted in the environment: none of them in stdout/stderr (MLflow's
    "View run ... at:" line included), the Prefect and flow logs, MLflow params/tags, artifacts, the
    run folder or Prefect's state."""
    from mlflow import MlflowClient

    from dpo_engine import tracking as registry
    from flows.dpo import dpo
    from test_flow_e2e import _overrides

    for k, v in PLANTED.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD")  # (it would be sent to the server as basic auth)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", http_store.uri.replace("http://", f"http://dpo-user:{URL_PASSWORD}@"))
    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    summary = dpo(overrides=_overrides(tiny, **{"registry.model_name": "tiny-sec"}), run_name="sec")
    assert summary["status"] == "completed" and summary["registered_version"]
    assert URL_PASSWORD not in str(summary)
    out, err = capfd.readouterr()
    assert "127.0.0.1" in summary["mlflow_tracking_uri"]  # the run did use the HTTP store

    registry.connect(http_store.uri)
    run = MlflowClient().get_run(summary["mlflow_run_id"])
    assert run.data.params["model.trust_remote_code"] == "False"
    recorded = [str(run.data.params), str(run.data.tags)]
    for mv in MlflowClient().search_model_versions("name='tiny-sec'"):
        recorded.append(str(mv.tags))

    secrets = [v.encode() for v in [*PLANTED.values(), URL_PASSWORD]]
    leaks = [f"captured output: {s!r}" for s in secrets if s in (out + err).encode()]
    leaks += [f"mlflow params/tags: {s!r}" for s in secrets if s in "".join(recorded).encode()]
    n = 0
    prefect_home = Path(os.environ.get("PREFECT_HOME", SESSION_HOME / "prefect"))
    for f in _files(dpo_home, SESSION_HOME / "prefect", prefect_home, http_store.root / "artifacts"):
        n += 1
        data = f.read_bytes()
        leaks += [f"{f}: {s!r}" for s in secrets if s in data]
    assert n > 20 and (http_store.root / "artifacts").is_dir()  # the run folder, Prefect state, artifacts
    assert not leaks, leaks


def test_saved_and_printed_errors_are_redacted(tmp_path):
    from dpo_engine.pipeline import write_summary

    uri = f"http://dpo-user:{URL_PASSWORD}@127.0.0.1:9"
    summary = write_summary(tmp_path, {}, "failed", error=f"TrackingUnavailable: cannot reach {uri}/api")
    assert URL_PASSWORD not in (tmp_path / "summary.json").read_text() and "***@127.0.0.1:9" in summary["error"]


def test_tracking_uri_password_is_refused_in_config_and_redacted_in_errors():
    """user:password in a tracking URI: refused in the config (it is saved with every run; MLflow
    takes MLFLOW_TRACKING_USERNAME/PASSWORD from the environment), and a URI from the environment
    that holds one is not shown in the error of a tracking server that cannot be reached (printed,
    and kept in summary.json's error)."""
    from data_contracts.config import ConfigError
    from data_contracts.helpers import redact_credentials
    from dpo_engine import tracking as registry

    uri = f"http://dpo-user:{URL_PASSWORD}@127.0.0.1:9"
    with pytest.raises(ConfigError, match="tracking.mlflow_tracking_uri: holds credentials") as err:
        load_config(None, {"tracking.mlflow_tracking_uri": uri})
    assert URL_PASSWORD not in str(err.value)
    with pytest.raises(registry.TrackingUnavailable) as err:
        registry.connect(uri, timeout=0.5)
    assert "127.0.0.1:9" in str(err.value) and URL_PASSWORD not in str(err.value), str(err.value)
    assert redact_credentials(f"at {uri}/api and s3://k:{URL_PASSWORD}@b/x") == \
        "at http://***@127.0.0.1:9/api and s3://***@b/x"
