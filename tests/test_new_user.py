"""What a new user tries first, as the README and ``--help`` write it (issue 22): each test here
failed before its fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from gen_fixtures import make_model_folder, one_thread  # noqa: F401 (autouse fixture)

from mixtral_lite.cli import main
from mixtral_lite.commands.generate import unescape_stop
from mixtral_lite.config import MixtralConfig
from mixtral_lite.generation.generate import generate
from mixtral_lite.generation.tokenizer import load_tokenizer
from mixtral_lite.weights.loading import load_model

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "the quick brown"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    make_model_folder(path, seed=0, max_position_embeddings=64)
    return path


def test_stop_escapes_are_read_as_python_escapes() -> None:
    assert unescape_stop(r"\n\n") == "\n\n"
    assert unescape_stop(r"\t🦙é") == "\t🦙é"  # non-ASCII stays as typed
    assert unescape_stop(r"a\\n") == "a\\n"  # an escaped backslash is one backslash
    with pytest.raises(ValueError, match=r"--stop '\\\\x': bad backslash escape"):
        unescape_stop(r"\x")


def test_stop_newline_on_the_command_line(folder, capsys) -> None:
    model, tok = load_model(folder), load_tokenizer(folder)
    expected = generate(model, tok, PROMPT, max_new_tokens=24).text
    cut = next((i for i, c in enumerate(expected) if c in "\n\t"), None)
    if cut is None:  # make the model's own continuation hold the stop text: stop at its first space
        cut, stop = expected.index(" ", 1), " "
    else:
        stop = expected[cut]
    typed = {"\n": r"\n", "\t": r"\t", " ": " "}[stop]
    args = ["generate", "--model", str(folder), "--prompt", PROMPT, "--max-new-tokens", "24", "--stop", typed]
    assert main(args) == 0
    out, err = capsys.readouterr()
    assert out == expected[:cut] + "\n"
    assert "finish: stop" in err


def test_stop_literal_backslash_n_is_no_longer_literal(folder, capsys) -> None:
    """A model that never writes a backslash: ``--stop "\\n"`` must stop at a newline or not at all,
    never on the two characters backslash and n."""
    args = ["generate", "--model", str(folder), "--prompt", PROMPT, "--max-new-tokens", "8", "--json"]
    assert main([*args, "--stop", r"\n"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert "\n" not in result["text"]


def test_params_takes_the_config_files_train_takes(capsys) -> None:
    assert main(["params", "--config", str(ROOT / "configs" / "tiny.json"), "--json"]) == 0
    counts = json.loads(capsys.readouterr().out)
    assert main(["params", "--preset", "tiny", "--json"]) == 0
    assert counts == json.loads(capsys.readouterr().out)
    assert main(["params", "--config", str(ROOT / "mixtral_lite" / "bundled" / "config.json")]) == 0
    assert "5,906,112" in capsys.readouterr().out  # a Hugging Face config.json still works


def test_train_resume_without_data(tmp_path, capsys) -> None:
    text = tmp_path / "a.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 40)
    config = {**MixtralConfig.from_preset("tiny").to_dict(), "vocab_size": 300, "num_hidden_layers": 1}
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps({**config, "train": {"batch_size": 2, "seq_len": 16, "warmup": 1}}))
    out = tmp_path / "run"
    args = ["train", "--config", str(cfg_file), "--data", str(text), "--out", str(out), "--tokenizer", "bytes"]
    assert main([*args, "--steps", "2", "--eval-interval", "2"]) == 0
    assert main(["train", "--resume", str(out), "--steps", "3", "--eval-interval", "3"]) == 0
    printed = capsys.readouterr().out
    assert "saved step 3" in printed
    assert "\r" not in printed
    assert "step 3: train loss" in printed  # evaluations are printed as lines when stderr is not a terminal
    text.unlink()
    assert main(["train", "--resume", str(out), "--steps", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("mixtral-lite train: error: --data:") and "gone" in err and len(err.splitlines()) == 1


def test_bench_without_transformers_one_line_exit_2(tmp_path) -> None:
    code = (
        "import sys; sys.modules['transformers'] = None\n"
        "from mixtral_lite.cli import main\n"
        f"sys.exit(main(['bench', '--quick', '--out', {str(tmp_path / 'b.json')!r}]))\n"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "mixtral-lite bench: error: transformers is not installed: pip install 'mixtral-lite[bench]', or pass "
        "--ours-only to time mixtral_lite alone"
    )
    assert not (tmp_path / "b.json").exists()


def test_bench_ours_only_needs_no_transformers(tmp_path, monkeypatch) -> None:
    from mixtral_lite.bench import Options, run_benchmark

    monkeypatch.setitem(sys.modules, "transformers", None)  # any import of it raises ImportError
    opts = Options(
        preset="tiny",
        dtypes=("float32",),
        prompt_len=8,
        decode_prompt_len=4,
        new_tokens=3,
        batch=2,
        repeats=1,
        quantize=False,
        compare=False,
        out=str(tmp_path / "bench.json"),
    )
    result = run_benchmark(opts)
    entry = result["dtypes"]["float32"]
    assert entry["ours"]["decode_b1_tok_s"] > 0 and "theirs" not in entry
    assert json.loads(next(tmp_path.glob("ckpt-*/bench_recipe.json")).read_text())["kind"] == "peaked-successor-ours"


def test_save_pretrained_with_tokenizer_runs_in_generate(folder, tmp_path, capsys) -> None:
    from mixtral_lite.weights.saving import save_pretrained

    model, tok = load_model(folder), load_tokenizer(folder)
    bare, full = tmp_path / "bare", tmp_path / "full"
    save_pretrained(model, bare)
    written = save_pretrained(model, full, tokenizer=tok)
    assert full / "tokenizer.model" in written
    assert main(["info", "--model", str(bare)]) == 0
    assert "tokenizer:   none" in capsys.readouterr().out
    assert main(["info", "--model", str(full)]) == 0
    assert "tokenizer:   tokenizer.model" in capsys.readouterr().out
    assert main(["generate", "--model", str(full), "--prompt", PROMPT, "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out == generate(model, tok, PROMPT, max_new_tokens=5).text + "\n"
    save_pretrained(model, tmp_path / "by_path", tokenizer=folder)  # a folder holding one works too
    assert (tmp_path / "by_path" / "tokenizer.model").read_bytes() == (folder / "tokenizer.model").read_bytes()
    with pytest.raises(TypeError, match="tokenizer: expected a Tokenizer"):
        save_pretrained(model, tmp_path / "bad", tokenizer=5)


def test_info_prints_sizes_in_their_unit(capsys) -> None:
    assert main(["info", "--model", str(ROOT / "mixtral_lite" / "bundled")]) == 0
    out = capsys.readouterr().out
    assert "5,906,112 total (5.91M)" in out and "0.00B" not in out


def test_python_errors_name_the_parameter(folder) -> None:
    from mixtral_lite.errors import UserError

    model, tok = load_model(folder), load_tokenizer(folder)
    with pytest.raises(ValueError, match="^temperature: expected a number >= 0, got -1"):
        generate(model, tok, PROMPT, temperature=-1)
    with pytest.raises(TypeError, match="^stop: expected a string or a list of strings, got int") as err:
        generate(model, tok, PROMPT, stop=5)
    assert isinstance(err.value, UserError)
    assert len(generate(model, tok, PROMPT).token_ids) <= 128  # max_new_tokens has a default


def test_cli_names_the_flag_for_the_same_error(folder, capsys) -> None:
    assert main(["generate", "--model", str(folder), "--prompt", PROMPT, "--temperature", "-1"]) == 2
    assert capsys.readouterr().err == "mixtral-lite generate: error: --temperature: expected a number >= 0, got -1.0\n"


def test_version_flag_prints_the_version_without_torch() -> None:
    code = "import sys; from mixtral_lite.cli import main\ntry:\n main(['--version'])\nexcept SystemExit: pass\n" \
        "print('torch' in sys.modules)"  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    from mixtral_lite import __version__

    assert out.stdout.splitlines() == [f"mixtral-lite {__version__}", "False"], out.stderr


def test_sampling_flags_at_temperature_0_warn(folder, capsys) -> None:
    args = ["generate", "--model", str(folder), "--prompt", PROMPT, "--max-new-tokens", "2", "--quiet-stats"]
    assert main([*args, "--top-k", "5", "--seed", "3"]) == 0
    err = capsys.readouterr().err
    assert "warning: --top-k, --seed ignored at --temperature 0 (greedy decoding)" in err
    assert main([*args, "--top-k", "5", "--temperature", "0.7"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_help_shows_defaults_and_choices(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "--max-new-tokens MAX_NEW_TOKENS tokens to generate at most (default: 128)" in out
    assert "--dtype {float32,bfloat16,float16}" in out
    assert "--quantize {int8,int4,int4-hqq,int4-mixed}" in out
    assert "(default: None)" not in out and "(default: False)" not in out


def test_threads_flag_sets_torch_threads_and_rejects_zero(folder, capsys) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        args = ["generate", "--model", str(folder), "--prompt", PROMPT, "--max-new-tokens", "1", "--quiet-stats"]
        assert main([*args, "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
        assert main([*args, "--threads", "0"]) == 2
        assert "--threads: expected an integer >= 1, got 0" in capsys.readouterr().err
    finally:
        torch.set_num_threads(before)


def test_chat_help_unknown_command_and_bundled_note(folder) -> None:
    lines = "/help\n/frobnicate\n/exit\n"
    out = subprocess.run(
        [sys.executable, "-m", "mixtral_lite", "chat", "--model", str(folder), "--max-new-tokens", "2"],
        input=lines, capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "/reset" in out.stderr and "start a new conversation" in out.stderr
    assert "unknown command /frobnicate: /help lists the commands" in out.stderr
    assert out.stdout == ""  # nothing reached the model


def test_model_hub_name_resolves_in_the_local_cache(folder, tmp_path, monkeypatch, capsys) -> None:
    """--model org/name finds the snapshot refs/main names in $HF_HUB_CACHE; absent: one line, exit 2."""
    import shutil

    cache = tmp_path / "hub"
    snap = cache / "models--someorg--tiny-moe" / "snapshots" / "abc123"
    shutil.copytree(folder, snap)
    (cache / "models--someorg--tiny-moe" / "refs").mkdir()
    (cache / "models--someorg--tiny-moe" / "refs" / "main").write_text("abc123\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    args = ["--prompt", PROMPT, "--max-new-tokens", "3", "--quiet-stats"]
    assert main(["generate", "--model", "someorg/tiny-moe", *args]) == 0
    assert main(["generate", "--model", str(folder), *args]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == out[1]  # the same model, by name and by folder
    assert main(["params", "--model", "someorg/tiny-moe"]) == 0
    capsys.readouterr()
    assert main(["generate", "--model", "someorg/absent", *args]) == 2
    err = capsys.readouterr().err
    assert "--model someorg/absent: no such folder, and not in the Hugging Face cache" in err
    assert "never downloads" in err


def test_no_compiler_is_said_once_not_silent(folder, tmp_path) -> None:
    env = {**os.environ, "CC": str(tmp_path / "no-such-cc"), "MIXTRAL_LITE_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": str(ROOT)}  # fmt: skip
    cmd = [sys.executable, "-m", "mixtral_lite", "generate", "--model", str(folder), "--prompt", PROMPT,
           "--max-new-tokens", "2", "--quiet-stats"]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("warning: the CPU kernel is unavailable") == 1, out.stderr
    quiet = subprocess.run(cmd, capture_output=True, text=True, env={**env, "MIXTRAL_LITE_NATIVE": "0"},
                           cwd=tmp_path, timeout=120)  # fmt: skip
    assert quiet.returncode == 0 and "warning" not in quiet.stderr, quiet.stderr
