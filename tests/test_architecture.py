"""The tree shows the architecture: layers import one way, no import cycles, no module reaches into
another's private names, files stay small, and each shared helper exists in one place."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data_contracts", "dpo_engine", "tasks", "flows")
LAYER = {"data_contracts": 0, "dpo_engine": 1, "tasks": 2, "flows": 3}
MAX_LINES = 450


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg in PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(f.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join(parts)] = f
    return mods


MODULES = _modules()


def _imports(name: str, path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, names taken from it, line) for every import in the file, lazy ones too."""
    out = []
    pkg = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out += [(a.name, [], node.lineno) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                if sub in MODULES:  # "from package import submodule"
                    out.append((sub, [], node.lineno))
                else:
                    out.append((base, [a.name], node.lineno))
    return out


def _graph() -> dict[str, set[str]]:
    graph = {m: set() for m in MODULES}
    for m, p in MODULES.items():
        for target, _, _ in _imports(m, p):
            if target in MODULES and target != m:
                graph[m].add(target)
    return graph


def test_no_import_cycles():
    graph, index, low, stack, on, cycles = _graph(), {}, {}, [], set(), []

    def strong(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            strong(v)
    assert not cycles, f"import cycles: {cycles}"


def test_layers_import_one_way():
    bad = []
    for m, p in MODULES.items():
        layer = LAYER[m.split(".")[0]]
        for target, _, line in _imports(m, p):
            top = target.split(".")[0]
            if top in LAYER and LAYER[top] > layer:
                bad.append(f"{p.relative_to(ROOT)}:{line} imports {target}")
            if top == "prefect" and layer < LAYER["tasks"]:
                bad.append(f"{p.relative_to(ROOT)}:{line} imports prefect below tasks/")
            if top in ("torch", "transformers", "peft") and layer == 0:
                bad.append(f"{p.relative_to(ROOT)}:{line}: data_contracts loads no models")
    assert not bad, "\n".join(bad)


def test_no_imports_of_private_names():
    bad = []
    for m, p in MODULES.items():
        for target, names, line in _imports(m, p):
            if target.split(".")[0] in LAYER and target != m:
                bad += [f"{p.relative_to(ROOT)}:{line} imports {target}.{n}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
    assert not bad, "\n".join(bad)


def test_files_stay_small():
    files = [f for pkg in PACKAGES + ("scripts",) for f in (ROOT / pkg).rglob("*.py")]
    big = {str(f.relative_to(ROOT)): n for f in files if (n := len(f.read_text().splitlines())) > MAX_LINES}
    assert not big, f"files over {MAX_LINES} lines: {big}"


# Each mechanism has one home: a second implementation anywhere else fails here.
ONE_HOME = {
    r"\bos\.replace\(": "data_contracts/helpers.py",  # atomic writes: atomic_write / write_text / write_json
    # file locks: file_lock, on the filelock package; no module takes a lock by hand (fcntl, msvcrt,
    # its own FileLock or portalocker)
    r"^\s*(import|from)\s+(fcntl|msvcrt|filelock|portalocker)\b|\bfcntl\.(flock|lockf)\(|\b(Soft)?FileLock\(":
        "data_contracts/helpers.py",
    r"os\.kill\([^,]+,\s*0\)": "data_contracts/helpers.py",  # process liveness: pid_alive
    r"://\)\[\^/@": "data_contracts/helpers.py",  # credential redaction: redact_credentials
}


@pytest.mark.parametrize("pattern", list(ONE_HOME))
def test_each_helper_has_one_home(pattern):
    home = ONE_HOME[pattern]
    hits = [f"{f.relative_to(ROOT)}" for pkg in PACKAGES for f in (ROOT / pkg).rglob("*.py")
            if re.search(pattern, f.read_text(), re.M) and str(f.relative_to(ROOT)) != home]
    assert not hits, f"{pattern!r} belongs in {home} only; also in {hits}"


def test_file_lock_is_built_on_filelock():
    """The one lock (``file_lock``) takes its locks through the filelock package, never by hand."""
    text = (ROOT / "data_contracts" / "helpers.py").read_text()
    assert re.search(r"^from filelock import .*\bFileLock\b", text, re.M), "file_lock must use filelock.FileLock"
    assert not re.search(r"^\s*(import|from)\s+fcntl\b|\bfcntl\.", text, re.M), "no flock by hand in helpers.py"


def _body(node) -> str:
    return "\n".join(ast.dump(stmt) for stmt in node.body)


def test_no_function_written_twice():
    """The same function body (four statements or more) in two places is a helper in two places,
    whatever the two copies are called."""
    seen: dict[str, list[str]] = {}
    for m, p in MODULES.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and len(node.body) >= 4:
                seen.setdefault(_body(node), []).append(f"{m}.{node.name}")
    twice = [where for where in seen.values() if len(where) > 1]
    assert not twice, f"the same function written more than once: {twice}"


def test_readme_layout_table_matches_the_tree():
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `([\w/.]+)` \|", section, re.M))
    assert listed, "README has no Layout table"
    for entry in listed:
        assert (ROOT / entry).exists(), f"README Layout lists {entry}, which does not exist"
    subpackages = {f"{p.relative_to(ROOT)}/" for pkg in PACKAGES for p in (ROOT / pkg).iterdir()
                   if p.is_dir() and (p / "__init__.py").is_file()}
    missing = sorted(subpackages - listed)
    assert not missing, f"README Layout table does not list {missing}"
