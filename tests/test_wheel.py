"""The wheel, installed into a clean virtual environment and run from another folder.

Slow (it installs torch into the new environment): part of ``make test-all`` and of CI
(``make wheel-check``), not of ``make test``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TORCH = os.environ.get("TORCH_VERSION", "2.13.0")


def _run(cmd: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"$ {' '.join(cmd)}\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out


@pytest.mark.slow
def test_wheel_in_a_clean_venv_generates_from_another_folder(tmp_path) -> None:
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)], tmp_path)
    wheel = next(dist.glob("mixtral_lite-*.whl"))
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], tmp_path)
    py = venv / "bin" / "python"
    _run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", f"torch=={TORCH}"], tmp_path)
    _run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)], tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    version = _run([str(py), "-m", "mixtral_lite", "--version"], elsewhere).stdout.strip()
    assert version.startswith("mixtral-lite "), version
    gen = _run([str(venv / "bin" / "mixtral-lite"), "generate", "--prompt", "ROMEO:", "--max-new-tokens", "8"],
               elsewhere)  # fmt: skip
    assert gen.stdout.strip(), gen.stderr
    installed = _run([str(py), "-m", "pip", "list", "--format=freeze"], elsewhere).stdout.lower()
    assert "huggingface" not in installed  # the default install pulls no hub client
