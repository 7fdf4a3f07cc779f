"""``mixtral-lite generate`` end to end on a tiny model folder: output, exit codes, every bad input.

A few runs go through a real subprocess (stdout, stderr, exit code, no traceback); the rest call
``mixtral_lite.cli.main`` in-process, which is the same code without the 3 s interpreter start.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
from gen_fixtures import make_model_folder, one_thread  # noqa: F401 (autouse fixture)

from mixtral_lite.cli import main
from mixtral_lite.commands import generate as generate_command
from mixtral_lite.generation.generate import generate
from mixtral_lite.generation.tokenizer import load_tokenizer
from mixtral_lite.weights.loading import load_model

CONTEXT = 64
PROMPT = "Xin chào 🦙 the quick"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    make_model_folder(path, seed=0, max_position_embeddings=CONTEXT)
    return path


@pytest.fixture(scope="module")
def no_tokenizer(tmp_path_factory):
    path = tmp_path_factory.mktemp("notok")
    make_model_folder(path, seed=0, tokenizer=None, max_position_embeddings=CONTEXT)
    return path


@pytest.fixture(scope="module")
def reference(folder):
    """What the library gives for PROMPT: the CLI must print exactly this."""
    model, tok = load_model(folder), load_tokenizer(folder)
    return model, tok, generate(model, tok, PROMPT, max_new_tokens=12)


def run_cli(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONIOENCODING": "utf-8"}
    return subprocess.run(
        [sys.executable, "-m", "mixtral_lite", *args],
        input=stdin,
        capture_output=True,
        text=True,
        encoding="utf-8",
        env=env,
        timeout=120,
    )


def test_subprocess_streams_the_text_and_prints_timing(folder, reference):
    proc = run_cli("generate", "--model", str(folder), "--prompt", PROMPT, "--max-new-tokens", "12")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == reference[2].text + "\n"
    assert any(ord(c) > 127 for c in PROMPT)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1
    for part in ("time to first token", "prefill", "decode", "tok/s", "finish: length"):
        assert part in lines[0]


def test_subprocess_bad_inputs_one_line_exit_2(folder, no_tokenizer, tmp_path):
    long_prompt = tmp_path / "long.txt"
    long_prompt.write_text("word " * 80)
    proc = run_cli("generate", "--model", str(folder), "--prompt-file", str(long_prompt))
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr.startswith("mixtral-lite generate: error: prompt: 82 tokens, longer than the model's context")
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    proc = run_cli("generate", "--model", str(no_tokenizer), "--prompt", "Hi")
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == f"mixtral-lite generate: error: {no_tokenizer}: no tokenizer found " + (
        "(expected tokenizer.model (SentencePiece) or tokenizer.json)\n"
    )


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


BAD = {
    "prompt-too-long": (["--prompt", "word " * 80], "prompt: 82 tokens, longer than the model's context allows"),
    "empty-prompt": (["--prompt", ""], "--prompt: the prompt is empty"),
    "empty-prompt-file": (["--prompt-file", "{empty}"], "--prompt-file {empty}: the prompt is empty"),
    "temperature<0": (["--prompt", "Hi", "--temperature", "-0.5"], "--temperature: expected a number >= 0, got -0.5"),
    "top-p=0": (["--prompt", "Hi", "--top-p", "0"], r"--top-p: expected a number in (0, 1], got 0.0"),
    "top-p>1": (["--prompt", "Hi", "--top-p", "1.5"], r"--top-p: expected a number in (0, 1], got 1.5"),
    "top-k<1": (["--prompt", "Hi", "--top-k", "0"], "--top-k: expected an integer >= 1, got 0"),
    "min-p>1": (["--prompt", "Hi", "--min-p", "2"], "--min-p: expected a number in [0, 1], got 2.0"),
    "max-new-tokens<1": (
        ["--prompt", "Hi", "--max-new-tokens", "0"],
        "--max-new-tokens: expected an integer >= 1, got 0",
    ),
    "empty-stop": (["--prompt", "Hi", "--stop", ""], "--stop: expected non-empty strings"),
    "unreadable-prompt-file": (["--prompt-file", "{missing}"], "--prompt-file {missing}: cannot read it (No such file"),
    "prompt-file-not-utf8": (["--prompt-file", "{latin1}"], "--prompt-file {latin1}: cannot read it ('utf-8' codec"),
    "system-without-chat": (["--prompt", "Hi", "--system", "S"], "--system: only used with --chat"),
    "no-prompt-on-a-terminal": ([], "no prompt: pass --prompt TEXT, --prompt-file FILE or pipe the text on stdin"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_input_one_line_exit_2(name, folder, tmp_path, capsys, monkeypatch):
    files = {"empty": tmp_path / "empty.txt", "missing": tmp_path / "missing.txt", "latin1": tmp_path / "l1.txt"}
    files["empty"].write_text("\n")
    files["latin1"].write_bytes("café".encode("latin-1"))
    args, message = BAD[name]
    args = [a.format(**files) for a in args]
    message = message.format(**files)
    monkeypatch.setattr(sys, "stdin", _Terminal())
    assert main(["generate", "--model", str(folder), *args]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith(f"mixtral-lite generate: error: {message}"), err
    assert err.count("\n") == 1


def test_model_folder_errors(tmp_path, no_tokenizer, capsys):
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "Hi"]) == 2
    assert capsys.readouterr().err == f"mixtral-lite generate: error: --model {tmp_path / 'nowhere'}: no such folder\n"
    assert main(["generate", "--model", str(no_tokenizer), "--prompt", "Hi"]) == 2
    assert "no tokenizer found" in capsys.readouterr().err
    if not (generate_command.BUNDLED / "config.json").exists():
        assert main(["generate", "--prompt", "Hi"]) == 2
        assert "the bundled model is missing" in capsys.readouterr().err


def test_json_stdin_and_chat(folder, reference, capsys, monkeypatch):
    model, tok, expected = reference
    monkeypatch.setattr(sys, "stdin", io.StringIO(PROMPT + "\n"))  # one trailing newline is dropped
    assert main(["generate", "--model", str(folder), "--max-new-tokens", "12", "--json", "--quiet-stats"]) == 0
    out, err = capsys.readouterr()
    result = json.loads(out)
    assert err == ""
    assert result["text"] == expected.text and result["token_ids"] == expected.token_ids
    assert result["finish_reason"] == "length" and result["prompt_tokens"] == len(tok.encode(PROMPT))
    assert result["stats"]["decode_tokens_per_s"] > 0 and len(result["logprobs"]) == 12

    args = ["generate", "--model", str(folder), "--prompt", "Hi", "--chat", "--system", "Be brief.", "--json"]
    assert main([*args, "--max-new-tokens", "6"]) == 0
    result = json.loads(capsys.readouterr().out)
    ids = tok.encode_chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    chat = generate(model, tok, ids, max_new_tokens=6, continuation=False)
    assert (result["prompt_tokens"], result["text"]) == (len(ids), chat.text)


def test_stop_string(folder, reference, capsys):
    expected = reference[2].text
    stop = expected[8:11]
    assert main(["generate", "--model", str(folder), "--prompt", PROMPT, "--max-new-tokens", "12", "--stop", stop]) == 0
    out, err = capsys.readouterr()
    assert out == expected[: expected.index(stop)] + "\n"
    assert "finish: stop" in err
