"""lm-eval's `local-completions` scores a local task through `mixtral-lite serve`; its
log-likelihoods equal the model's own (scripts/lm_eval_check.py). Slow: needs `lm-eval` and
starts a server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_lm_eval_local_completions_matches_the_model() -> None:
    pytest.importorskip("lm_eval")
    out = subprocess.run([sys.executable, str(ROOT / "scripts/lm_eval_check.py"), "--docs", "12"],
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    assert "greedy flags equal: True" in out.stdout
