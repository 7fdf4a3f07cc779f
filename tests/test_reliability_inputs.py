"""Hostile inputs get one clear line naming the culprit: config bombs and wrong types, broken
safetensors headers, diverging or misconfigured training, a state file without its optimizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mixtral_lite import Mixtral, MixtralConfig, save_pretrained
from mixtral_lite.config import ConfigError
from mixtral_lite.errors import UserError
from mixtral_lite.training.train import STATE_FILE, TrainConfig, read_state
from mixtral_lite.weights.checkpoint import read_safetensors_header

ROOT = Path(__file__).resolve().parent.parent


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "mixtral_lite", *args], capture_output=True, text=True, env=env, timeout=timeout
    )


def one_line(result: subprocess.CompletedProcess, culprit: str) -> None:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and culprit in lines[0], result.stderr


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny")
    model = Mixtral(MixtralConfig.from_preset("tiny"))
    model.reset_parameters(std=0.02, generator=torch.Generator().manual_seed(0))
    save_pretrained(model, folder)
    return folder


BOMBS = [
    ("num_hidden_layers", 1_000_000, "num_hidden_layers"),
    ("hidden_size", 10**9, "hidden_size"),
    ("vocab_size", 10**10, "vocab_size"),
    ("rope_theta", "1e6", "rope_theta"),
    ("rms_norm_eps", "x", "rms_norm_eps"),
    ("sliding_window", "x", "sliding_window"),
    ("eos_token_id", [], "eos_token_id"),
    ("tie_word_embeddings", "false", "tie_word_embeddings"),
    ("rope_theta", float("inf"), "rope_theta"),
    ("rope_scaling", {"type": "linear", "factor": 2.0}, "rope_scaling"),
    ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, "rope_scaling"),
]


@pytest.mark.parametrize("key,value,culprit", BOMBS, ids=[f"{k}={v!r}" for k, v, _ in BOMBS])
def test_config_bombs_refused_fast(saved, tmp_path, key, value, culprit):
    data = json.loads((saved / "config.json").read_text())
    data[key] = value
    bad = tmp_path / "m"
    bad.mkdir()
    for f in saved.iterdir():
        (bad / f.name).symlink_to(f)
    (bad / "config.json").unlink()
    (bad / "config.json").write_text(json.dumps(data))
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match=culprit):
        MixtralConfig.from_pretrained(bad)
    assert time.perf_counter() - t0 < 0.5  # refused before anything is built
    t0 = time.perf_counter()
    one_line(cli("params", "--model", str(bad)), culprit)
    assert time.perf_counter() - t0 < 20  # mostly interpreter start-up on a shared machine; the check is ms


def _header_file(path: Path, header: dict, data: bytes) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


HEADERS = [
    (
        {
            "a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
            "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        },
        12,
        "overlaps",
    ),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0.0, 8]}}, 8, "data_offsets"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", 8]}}, 8, "data_offsets"),
    ({"a": {"dtype": ["F32"], "shape": [2], "data_offsets": [0, 8]}}, 8, "dtype"),
    ({"a": {"dtype": "F32", "shape": ["2"], "data_offsets": [0, 8]}}, 8, "shape"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, 16, "after the last tensor"),
    ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, 8, "gap"),
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}, 8, "truncated"),
    ({"a": [1, 2]}, 8, "corrupt"),
]


@pytest.mark.parametrize("header,size,culprit", HEADERS)
def test_header_validator(tmp_path, header, size, culprit):
    path = _header_file(tmp_path / "model.safetensors", header, b"\0" * size)
    with pytest.raises(UserError, match=culprit):
        read_safetensors_header(path)


def test_info_and_generate_name_a_broken_header(saved, tmp_path):
    bad = tmp_path / "m"
    bad.mkdir()
    (bad / "config.json").write_text((ROOT / "mixtral_lite" / "bundled" / "config.json").read_text())
    _header_file(bad / "model.safetensors", HEADERS[1][0], b"\0" * 8)
    (bad / "tokenizer.model").symlink_to(ROOT / "mixtral_lite" / "bundled" / "tokenizer.model")
    one_line(cli("generate", "--model", str(bad), "--prompt", "hi", "--max-new-tokens", "1"), "data_offsets")
    result = cli("info", "--model", str(bad))
    assert "Traceback" not in result.stderr and "data_offsets" in result.stdout + result.stderr


@pytest.mark.parametrize(
    "field,value",
    [("lr", float("inf")), ("weight_decay", float("inf")), ("init_std", float("inf")), ("lr", "x"), ("beta2", 1.0)],
)
def test_train_hyper_parameters_checked(field, value):
    with pytest.raises(UserError, match=f"train.{field}"):
        TrainConfig(**{field: value})


def test_train_cli_refuses_inf_lr_and_huge_batch(tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("hello world " * 200)
    common = ["train", "--config", "tiny", "--data", str(data), "--out", str(tmp_path / "o"), "--tokenizer", "bytes"]
    one_line(cli(*common, "--lr", "inf"), "train.lr")
    one_line(cli(*common, "--batch-size", "100000000"), "batch_size")


def test_diverged_run_saves_nothing(tmp_path, monkeypatch):
    from mixtral_lite.training import train as train_module
    from mixtral_lite.training.data import ByteTokenizer, TokenData

    data = tmp_path / "d.txt"
    data.write_text("hello world " * 300)
    tokens = TokenData.from_file(data, ByteTokenizer(), 0.1)
    config = MixtralConfig.from_preset("tiny")
    cfg = TrainConfig(steps=4, batch_size=2, seq_len=16, eval_interval=100, eval_batches=1, warmup=0)
    out = tmp_path / "run"
    train_module.train(config, cfg, tokens, out, progress=False, log=lambda s: None)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = train_module.F.cross_entropy
    monkeypatch.setattr(train_module.F, "cross_entropy", lambda *a, **k: real(*a, **k) * float("nan"))
    with pytest.raises(train_module.Diverged, match="step 5: training loss is nan"):
        train_module.train(config, TrainConfig(**{**cfg.__dict__, "steps": 8}), tokens, out, resume=out, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the good checkpoint is untouched


def test_unwritable_out_found_before_the_first_step(tmp_path):
    """An --out below a file cannot be written (even by root): the run fails before step 1."""
    data = tmp_path / "d.txt"
    data.write_text("hello world " * 200)
    (tmp_path / "file").write_text("")
    out = tmp_path / "file" / "run"
    result = cli("train", "--config", "tiny", "--data", str(data), "--out", str(out), "--tokenizer", "bytes")
    one_line(result, "--out")
    assert "step" not in result.stdout.replace("data:", "")


def test_state_without_optimizer(tmp_path):
    torch.save({"step": 1, "losses": [], "val": [], "data_signature": [], "train_config": {}}, tmp_path / STATE_FILE)
    with pytest.raises(UserError, match="missing optimizer, data_rng"):
        read_state(tmp_path)
