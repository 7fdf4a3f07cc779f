"""``scripts/gpu_check.sh --dry-run``: the GPU check's code paths on the CPU, from outside the repo.

The real run gets a GPU for a few minutes; this makes sure it imports from a bare clone (the
script sets ``PYTHONPATH``), parses its arguments, measures every row and writes the JSON.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def test_dry_run_takes_every_path_and_writes_results(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OUT=str(tmp_path), PY=sys.executable)
    args = ["--dry-run", "--layers", "1", "--new-tokens", "2", "--repeats", "1", "--batches", "1"]
    done = subprocess.run(
        ["bash", str(SCRIPT), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"mixtral_lite from {ROOT / 'mixtral_lite'}" in done.stdout
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(data["runs"]) == {f"{w}_{m}_b1" for w in ("bf16", "int8") for m in ("eager", "compiled")}
    assert all(run["tok_s"] > 0 for run in data["runs"].values()), data["runs"]
    assert data["sdpa_decode_backend"] == "efficient (predicted)"
    assert data["tests"] is not None  # the tests' outcome is reported, never a reason to stop
    assert "weights mode" in done.stdout  # the one table


def test_budget_is_below_the_timeout() -> None:
    """The benchmark's budget must end before its ``timeout`` does (it was 360 s against 300 s)."""
    text = SCRIPT.read_text()
    budget = float(re.search(r"--budget-s (\d+)", text).group(1))
    timeout = float(re.search(r"timeout (\d+) \"\$PY\" -u scripts/gpu_check.py", text).group(1))
    assert budget + 60 <= timeout
    assert "set -e" not in text.replace("set -euo", "").replace(
        "set -uo", ""
    )  # a failed test never skips the benchmark
