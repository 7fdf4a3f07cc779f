"""``mixtral_lite.eval`` and ``mixtral-lite eval``: the windows cover every token once, one window
equals the plain cross-entropy, a model against itself has KL 0 and full agreement, a quantised
model's KL equals the KL computed by hand, and the CLI's errors and JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from mixtral_lite import load_model, load_tokenizer, quantize_model
from mixtral_lite.cli import main
from mixtral_lite.errors import UserError
from mixtral_lite.eval import evaluate, windows

BUNDLED = Path(__file__).resolve().parent.parent / "mixtral_lite" / "bundled"
TEXT = (BUNDLED / "heldout.txt").read_text()[:3000]


@pytest.fixture(scope="module")
def bundled():
    return load_model(BUNDLED, progress=False), load_tokenizer(BUNDLED)


@pytest.mark.parametrize("n,context,stride", [(2, 2, 1), (10, 4, 3), (10, 4, 1), (100, 16, 5), (17, 64, 32), (1, 4, 2)])
def test_windows_score_every_token_once(n: int, context: int, stride: int) -> None:
    scored = []
    for begin, end, first in windows(n, context, stride):
        assert end - begin <= context and begin < first <= end
        scored += range(first, end)
    assert scored == list(range(1, n))


def test_windows_reject_bad_arguments() -> None:
    with pytest.raises(UserError, match=r"stride: expected 1 .. context - 1 \(3\), got 4"):
        windows(10, 4, 4)
    with pytest.raises(UserError, match="context: expected at least 2"):
        windows(10, 1, 1)


def test_one_window_is_the_plain_cross_entropy(bundled) -> None:
    model, tok = bundled
    ids = [tok.bos_id, *tok.encode(TEXT, bos=False)[:200]]
    result = evaluate(model, tok, TEXT, context=256, max_tokens=200)
    logits = model(torch.tensor([ids]))[0, :-1].float()
    want = F.cross_entropy(logits, torch.tensor(ids[1:])).item()
    assert result.tokens == 200 and result.windows == 1
    assert result.nll == pytest.approx(want, rel=1e-5)  # float64 sum vs float32 mean
    assert result.ppl == pytest.approx(math.exp(want), rel=1e-5)
    assert result.nats_per_byte == pytest.approx(result.nll * 200 / result.bytes, rel=1e-9)
    assert result.kl_mean is None


def test_more_context_lowers_perplexity(bundled) -> None:
    """The same tokens with a stride of a quarter window see more context than disjoint windows."""
    model, tok = bundled
    disjoint = evaluate(model, tok, TEXT, context=64, stride=63, max_tokens=512)
    sliding = evaluate(model, tok, TEXT, context=64, stride=16, max_tokens=512)
    assert disjoint.tokens == sliding.tokens == 512
    assert sliding.windows > disjoint.windows
    assert sliding.nll < disjoint.nll


def test_model_against_itself(bundled) -> None:
    model, tok = bundled
    r = evaluate(model, tok, TEXT, reference=model, context=128, max_tokens=300)
    assert r.kl_mean == pytest.approx(0.0, abs=1e-7) and r.kl_max == pytest.approx(0.0, abs=1e-6)
    assert r.top1_agreement == 1.0 and r.ppl_ratio == pytest.approx(1.0, abs=1e-9)


def test_kl_of_a_quantised_model_equals_the_hand_computed_one(bundled) -> None:
    reference, tok = bundled
    model = quantize_model(load_model(BUNDLED, progress=False), "int8")
    r = evaluate(model, tok, TEXT, reference=reference, context=160, max_tokens=150)
    x = torch.tensor([[tok.bos_id, *tok.encode(TEXT, bos=False)[:150]]])
    lp, lr = (F.log_softmax(m(x)[0, :-1].float(), -1) for m in (model, reference))
    kl = (lr.exp() * (lr - lp)).sum(-1)
    # KL ~2e-5 here: float32 log-probabilities cancel to about 1e-7 (the two runs batch differently)
    assert r.kl_mean == pytest.approx(kl.mean().item(), abs=2e-7)
    assert r.kl_max == pytest.approx(kl.max().item(), abs=2e-6)
    assert r.top1_agreement == pytest.approx((lp.argmax(-1) == lr.argmax(-1)).float().mean().item())
    assert 0 < r.kl_mean < 0.05  # int8: a small, nonzero divergence


def test_errors(bundled) -> None:
    model, tok = bundled
    with pytest.raises(UserError, match="text: no tokens"):
        evaluate(model, tok, "")
    with pytest.raises(UserError, match="context: the model was made for 1024 positions, got 4096"):
        evaluate(model, tok, TEXT, context=4096)


def test_cli_json_and_errors(tmp_path, capsys) -> None:
    data = tmp_path / "t.txt"
    data.write_text(TEXT)
    argv = ["eval", "--model", str(BUNDLED), "--data", str(data), "--context", "64", "--max-tokens", "100"]
    assert main([*argv, "--reference", str(BUNDLED), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["tokens"] == 100 and out["kl_mean"] == pytest.approx(0, abs=1e-7) and out["top1_agreement"] == 1
    assert main(argv) == 0
    assert "perplexity" in capsys.readouterr().out
    assert main([*argv, "--stride", "64"]) == 2
    assert "--stride: expected 1 .. context - 1 (63), got 64" in capsys.readouterr().err
    (tmp_path / "bad.txt").write_bytes(b"\xff\xfe")
    assert main(["eval", "--model", str(BUNDLED), "--data", str(tmp_path / "bad.txt")]) == 2
    assert "not UTF-8 text" in capsys.readouterr().err
    assert main(["eval", "--model", str(BUNDLED), "--data", str(tmp_path / "none.txt")]) == 2
    assert "cannot read it" in capsys.readouterr().err
