"""Every command block of the README runs as written, against a tiny model.

The shell and Python blocks are read from README.md itself, so an edited or added line is run
too. Substitutions, all listed here: the model folders the README names (``/data/Mixtral-8x7B*``,
``DIR``) become a tiny random model with the real Mistral tokenizer; ``mixtral-lite`` is this
interpreter's ``-m mixtral_lite``; training runs 3 and 6 steps of 64 tokens instead of 600 and
1200 of 256; the paths the README writes (``runs/``, ``out/``, ``text.txt``: 4 KB of the bundled
held-out text) land in a temporary folder.
Lines that need what a test machine lacks (GPUs, a second network server) or that are this very
suite are skipped by an explicit list, each with the test that covers it instead; the test fails
when a skip no longer matches a README line, so the list cannot go stale.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from gen_fixtures import make_model_folder

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")

# a README line starting with one of these is not run here; the value says what covers it
SKIPS = {
    "make test": "this suite",
    "python3 -m venv .venv": "tests/test_wheel.py (a clean venv)",
    ".venv/bin/pip install": "tests/test_wheel.py (a clean venv)",
    "mixtral-lite serve": "tests/test_serve.py (the server and the openai client)",
    "torchrun": "tests/test_parallel.py (gloo, 2 ranks)",
    "OUT=/some/dir bash scripts/gpu_check.sh": "tests/test_gpu_check.py (--dry-run)",
    "mixtral-lite generate --model DIR --device-map": "needs CUDA GPUs; tests/test_device_map.py (fake devices)",
    "mixtral-lite generate --model DIR --device cuda": "needs a CUDA GPU; tests/test_offload.py (a stand-in device)",
    "mixtral-lite generate --model mixtral-8x7b.Q4_0.gguf": "tests/test_gguf.py (GGUFs written by the gguf package)",
}
PY_SKIPS = {
    "from openai import OpenAI": "tests/test_serve.py (a running server)",
    'model = load_model(DIR, device_map="auto")': "needs CUDA GPUs; tests/test_device_map.py",
}


def blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def shell_lines() -> list[str]:
    lines = []
    for body in blocks("bash"):
        for line in body.replace("\\\n", " ").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                lines.append(re.sub(r"\s+#\s.*$", "", line).strip())
    return lines


def _skipped(line: str, skips: dict[str, str]) -> str | None:
    return next((k for k in skips if line.startswith(k)), None)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> dict:
    model = tmp_path_factory.mktemp("model")
    # 8x7B's 32 layers (the README's layer counts hold); an expert size that int4's groups of 64 divide
    make_model_folder(model, seed=0, max_position_embeddings=512, num_hidden_layers=32, intermediate_size=128)
    cwd = tmp_path_factory.mktemp("cwd")
    text = (ROOT / "mixtral_lite/bundled/heldout.txt").read_text(encoding="utf-8")[:4000]
    (cwd / "text.txt").write_text(text, encoding="utf-8")  # the README's `--data text.txt`
    return {"model": model, "cwd": cwd}


def substitute(line: str, model: Path) -> str:
    line = re.sub(r"/data/Mixtral-8x7B(-Instruct)?-v0\.1", str(model), line)
    line = re.sub(r"(--model|--reference) DIR\b", rf"\1 {model}", line)
    line = line.replace("mixtral_lite/bundled/heldout.txt", str(ROOT / "mixtral_lite/bundled/heldout.txt"))
    line = line.replace("--steps 600", "--steps 3").replace("--steps 1200", "--steps 6")
    line = line.replace("--seq-len 256", "--seq-len 64")
    return line.replace("mixtral-lite ", f"{shlex.quote(sys.executable)} -m mixtral_lite ")


def test_every_skip_still_matches_a_readme_line() -> None:
    lines = shell_lines()
    for key in SKIPS:
        assert any(line.startswith(key) for line in lines), f"SKIPS[{key!r}] matches no README line"
    py = blocks("python")
    for key in PY_SKIPS:
        assert any(b.lstrip().startswith(key) for b in py), f"PY_SKIPS[{key!r}] matches no README block"


def test_readme_shell_lines_run_as_written(work) -> None:
    """Each line in the README's order (training, then generating from what was trained)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    ran = 0
    for line in shell_lines():
        if _skipped(line, SKIPS):
            continue
        if line == "make run":
            if not (ROOT / ".venv/bin/mixtral-lite").exists():
                continue  # the suite runs outside the Makefile's venv
            cmd, cwd = line, ROOT
        else:
            cmd, cwd = substitute(line, work["model"]), work["cwd"]
        stdin = "Hello there\n/exit\n" if " chat " in cmd else None
        out = subprocess.run(cmd, shell=True, cwd=cwd, env=env, input=stdin, capture_output=True, text=True,
                             timeout=600)  # fmt: skip
        assert out.returncode == 0, f"README line failed: {line}\n$ {cmd}\n{out.stderr[-2000:]}"
        assert "Traceback" not in out.stderr, f"{line}\n{out.stderr[-2000:]}"
        ran += 1
    assert ran >= 12


def test_readme_python_blocks_run_as_written(work) -> None:
    """The Python blocks in order, in one interpreter (later blocks use the first one's imports and
    ``DIR``, the model folder a reader substitutes)."""
    code = [f"DIR = {str(work['model'])!r}"]
    for body in blocks("python"):
        if _skipped(body.lstrip(), PY_SKIPS):
            continue
        body = re.sub(r"/data/Mixtral-8x7B(-Instruct)?-v0\.1", str(work["model"]), body)
        code.append(body.replace('device="cuda"', 'device="cpu"'))  # no GPU on a test machine
    script = work["cwd"] / "blocks.py"
    script.write_text("\n".join(code), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(script)], cwd=work["cwd"], env=env, capture_output=True, text=True,
                         timeout=600)  # fmt: skip
    assert out.returncode == 0, f"README Python blocks failed:\n{out.stderr[-3000:]}"
