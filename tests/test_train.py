"""Training loop: schedule, data split, exact resume, and the train / train-tokenizer commands."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mixtral_lite import MixtralConfig
from mixtral_lite.cli import main
from mixtral_lite.errors import UserError
from mixtral_lite.training.data import ByteTokenizer, SentencePieceTokenizer, TokenData, train_sentencepiece, windows
from mixtral_lite.training.train import TrainConfig, lr_at, train

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n\n"
    "First Citizen:\nYou are all resolved rather to die than to famish?\n\nAll:\nResolved. resolved.\n\n"
) * 40


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the test machine's cores are shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(**moe) -> MixtralConfig:
    data = MixtralConfig.from_preset("tiny").to_dict()
    data.update(vocab_size=264, hidden_size=32, intermediate_size=48, head_dim=8)
    data["moe"] = {**data["moe"], **moe}
    return MixtralConfig.from_dict(data)


def test_lr_schedule_warmup_then_cosine():
    cfg = TrainConfig(steps=110, warmup=10, lr=1e-3, min_lr=1e-4)
    assert lr_at(0, cfg) == pytest.approx(1e-4)  # (0 + 1) / 10 of the peak
    assert lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(60, cfg) == pytest.approx(1e-4 + 0.5 * 9e-4 * (1 + math.cos(math.pi * 0.5)))
    assert lr_at(110, cfg) == pytest.approx(1e-4)


def test_split_is_contiguous_and_windows_start_with_bos():
    data = TokenData.from_ids(list(range(3, 103)), val_fraction=0.1)
    assert data.train.tolist() == list(range(3, 93)) and data.val.tolist() == list(range(93, 103))
    x, y = windows(data.train, [0, 5], 4, bos=1)
    assert x.tolist() == [[1, 3, 4, 5], [1, 8, 9, 10]] and y.tolist() == [[3, 4, 5, 6], [8, 9, 10, 11]]
    x, y = windows(data.train, [0], 4, bos=None)
    assert x.tolist() == [[3, 4, 5, 6]] and y.tolist() == [[4, 5, 6, 7]]
    a = data.val_batches(2, 4, 2, bos=1)
    assert [t.tolist() for t in a[0]] == [t.tolist() for t in data.val_batches(2, 4, 2, bos=1)[0]]


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok.encode("héllo\n")
    assert min(ids) >= 3 and max(ids) < 259 and tok.decode(ids) == "héllo\n"


def test_sentencepiece_like_mixtral(tmp_path):
    (tmp_path / "t.txt").write_text(TEXT)
    tok = SentencePieceTokenizer(train_sentencepiece(tmp_path / "t.txt", 300, tmp_path / "tok"))
    sp = tok.sp
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id(), sp.get_piece_size()) == (0, 1, 2, 300)
    assert sp.id_to_piece(3) == "<0x00>" and sp.id_to_piece(258) == "<0xFF>"
    assert tok.decode(tok.encode(TEXT[:300] + "€")) == TEXT[:300] + "€"  # unseen char: byte fallback


@pytest.mark.parametrize("moe", [{}, {"num_experts": 8, "score_func": "sigmoid", "bias_balancing": True}])
def test_resume_reproduces_uninterrupted_run(tmp_path, moe):
    config = tiny_config(**moe)
    data = TokenData.from_file(_write(tmp_path, TEXT), ByteTokenizer())
    cfg = TrainConfig(steps=6, batch_size=4, seq_len=32, warmup=2, lr=3e-3, eval_interval=3, eval_batches=2)
    straight = train(config, cfg, data, None, progress=False, log=lambda s: None)
    first = train(config, cfg, data, tmp_path / "half", stop_at=3, progress=False, log=lambda s: None)
    assert first.step == 3 and len(first.losses) == 3
    resumed = train(config, cfg, data, tmp_path / "full", resume=tmp_path / "half", progress=False, log=lambda s: None)
    assert resumed.losses == straight.losses  # exact: same floats, step for step
    assert resumed.val == straight.val
    for a, b in zip(resumed.model.state_dict().values(), straight.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    if moe:
        assert resumed.model.layers[0].feed_forward.expert_bias.abs().sum() > 0  # the bias moved and was kept


def test_training_lowers_validation_loss(tmp_path):
    data = TokenData.from_file(_write(tmp_path, TEXT), ByteTokenizer())
    cfg = TrainConfig(steps=30, batch_size=8, seq_len=32, warmup=3, lr=1e-2, eval_interval=15, eval_batches=2)
    result = train(tiny_config(), cfg, data, None, progress=False, log=lambda s: None)
    assert result.val[-1]["val_loss"] < 0.7 * math.log(264), result.val  # from ~5.58 (uniform) to below 3.9
    assert 0 <= result.val[-1]["load_cv"] and len(result.val[-1]["share"]) == 2


def test_resume_on_other_data_is_an_error(tmp_path):
    config = tiny_config()
    cfg = TrainConfig(steps=2, batch_size=2, seq_len=16, warmup=1, eval_interval=2, eval_batches=1)
    data = TokenData.from_file(_write(tmp_path, TEXT), ByteTokenizer())
    train(config, cfg, data, tmp_path / "run", progress=False, log=lambda s: None)
    other = TokenData.from_file(_write(tmp_path, TEXT.upper(), "b.txt"), ByteTokenizer())
    with pytest.raises(UserError, match="other data"):
        train(config, cfg, other, None, resume=tmp_path / "run", progress=False)


def test_cli_train_then_load_and_resume(tmp_path, capsys):
    from mixtral_lite.generation.tokenizer import load_tokenizer
    from mixtral_lite.weights.loading import load_model

    text = _write(tmp_path, TEXT)
    cfg_file = tmp_path / "cfg.json"
    config = tiny_config().to_dict()
    config["vocab_size"] = 320
    import json

    cfg_file.write_text(json.dumps({**config, "train": {"batch_size": 2, "seq_len": 16, "warmup": 1}}))
    out = tmp_path / "run"
    args = ["train", "--config", str(cfg_file), "--data", str(text), "--out", str(out), "--steps", "4"]
    assert main([*args, "--stop-at", "2", "--eval-interval", "2", "--no-progress"]) == 0
    assert main(["train", "--resume", str(out), "--data", str(text), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "saved step 4" in printed and "training a SentencePiece tokenizer (vocab 320)" in printed
    model = load_model(out)
    assert model.config.vocab_size == 320
    tok = load_tokenizer(out)
    ids = torch.tensor([tok.encode("First Citizen:")])
    assert model(ids).shape == (1, ids.shape[1], 320)


def test_cli_errors_exit_2(tmp_path, capsys):
    assert main(["train", "--data", str(tmp_path / "missing.txt"), "--config", "tiny"]) == 2
    assert "--config and --out are required" in capsys.readouterr().err
    assert main(["train", "--data", "x.txt", "--config", "nope", "--out", str(tmp_path)]) == 2
    assert "no such file and not a preset" in capsys.readouterr().err
    assert main(["train-tokenizer", "--data", "x.txt", "--vocab-size", "100", "--out", str(tmp_path)]) == 2


@pytest.mark.slow
def test_shakespeare_smoke(tmp_path):
    if not SHAKESPEARE.is_file():
        pytest.skip("tinyshakespeare.txt not present")
    data = TokenData.from_file(SHAKESPEARE, ByteTokenizer())
    cfg = TrainConfig(steps=200, batch_size=16, seq_len=64, warmup=10, lr=3e-3, eval_interval=200, eval_batches=4)
    result = train(tiny_config(), cfg, data, None, progress=False, log=lambda s: None)
    assert result.val[-1]["val_loss"] < 2.8


def _write(folder: Path, text: str, name: str = "a.txt") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def test_compare_script_writes_table(tmp_path):
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "scripts" / "compare_moe.py"
    spec = importlib.util.spec_from_file_location("compare_moe", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "cmp.md"
    out.write_text("# Title\n\nkept text\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\nkept too\n")
    data = _write(tmp_path, TEXT)
    args = ["--steps", "2", "--batch-size", "2", "--seq-len", "16", "--eval-batches", "1", "--variants", "dense,hard"]
    assert module.main([str(data), *args, "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# Title\n\nkept text") and text.endswith("kept too\n") and "old" not in text
    rows = [line for line in text.splitlines() if line.startswith("| dense") or line.startswith("| hard")]
    assert len(rows) == 3  # dense, hard without and with the aux loss
