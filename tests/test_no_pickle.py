"""No pickle anywhere, on the wire or on disk: a check over the project's own source that fails the suite.

Pickle (and what wraps it: torch.load/save, numpy's allow_pickle, joblib, dill, shelve, marshal) runs code
when it loads, so a payload from a device nobody controls must never reach it. Tensors travel and rest as
safetensors, everything else as JSON. The one exemption is the test that builds a malicious pickle file to
prove the adapter loader refuses it without unpickling it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["schemas", "broker", "aggregator", "edge_client", "flexlora", "bench", "experiments", "tests"]
MODULES = {"pickle", "cPickle", "_pickle", "dill", "cloudpickle", "joblib", "shelve", "marshal", "copyreg"}
CALLS = {("torch", "load"), ("torch", "save"), ("pd", "read_pickle"), ("pandas", "read_pickle")}
EXEMPT = {Path("tests/aggregator/test_adapters.py"): "builds a hostile pickle to prove it is never loaded"}


def _sources() -> list[Path]:
    return sorted(p for pkg in PACKAGES if (ROOT / pkg).is_dir() for p in (ROOT / pkg).rglob("*.py"))


def _offences(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Import):
            found += [f"{line}: import {a.name}" for a in node.names if a.name.split(".")[0] in MODULES]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in MODULES:
            found.append(f"{line}: from {node.module} import ...")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if isinstance(owner, ast.Name) and (owner.id, node.func.attr) in CALLS:
                found.append(f"{line}: {owner.id}.{node.func.attr}(...)")
            if any(
                k.arg == "allow_pickle" and not (isinstance(k.value, ast.Constant) and k.value.value is False)
                for k in node.keywords
            ):
                found.append(f"{line}: {ast.unparse(node.func)}(allow_pickle=...)")
    return found


def test_the_check_finds_what_it_looks_for(tmp_path: Path) -> None:
    sample = tmp_path / "probe.py"
    sample.write_text(
        "import pickle\nimport torch\nx = torch.load('f')\nimport numpy as np\nnp.load('f', allow_pickle=True)\n"
    )
    assert _offences(sample) == ["1: import pickle", "3: torch.load(...)", "5: np.load(allow_pickle=...)"]


@pytest.mark.parametrize("path", _sources(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_pickle_in_the_project(path: Path) -> None:
    if path.relative_to(ROOT) in EXEMPT:
        return
    assert _offences(path) == []
