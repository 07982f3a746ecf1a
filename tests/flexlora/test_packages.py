"""The project's generic import names (schemas, broker, …) are checked at start-up: a device whose environment
holds another package of one of those names gets a clear refusal naming it, not an ImportError mid-round."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from flexlora.packages import PACKAGES, check_own_packages

ROOT = Path(__file__).resolve().parents[2]


def _start(pythonpath: list[Path], cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(p) for p in pythonpath)}
    code = "import sys; sys.argv = ['flexlora', '--help']; from flexlora.entry import main; main()"
    return subprocess.run([sys.executable, "-c", code], env=env, cwd=cwd, capture_output=True, text=True, timeout=120)


def test_our_own_installation_passes_the_check() -> None:
    check_own_packages()
    assert set(PACKAGES) >= {"schemas", "broker", "aggregator", "edge_client"}


def test_a_package_named_like_ours_earlier_on_the_path_is_refused_by_name(tmp_path: Path) -> None:
    other = tmp_path / "schemas"
    other.mkdir()
    (other / "__init__.py").write_text("raise ImportError('not the schemas FlexLoRA needs')\n")
    got = _start([tmp_path, ROOT], tmp_path)
    assert got.returncode == 2, got.stderr
    assert "'schemas'" in got.stderr and str(other) in got.stderr and "virtualenv" in got.stderr


def test_the_command_starts_when_nothing_shadows_it(tmp_path: Path) -> None:
    got = _start([ROOT], tmp_path)
    assert got.returncode == 0, got.stderr
    assert "aggregator" in got.stdout
