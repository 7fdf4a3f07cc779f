"""The bundled Shakespeare model: shipped, small, a real Mixtral, and as good as its card says."""

from __future__ import annotations

import re

import pytest
import torch

from mixtral_lite import count_parameters, load_model, load_tokenizer
from mixtral_lite.cli import main
from mixtral_lite.commands.generate import BUNDLED
from mixtral_lite.training.heldout import heldout_loss


@pytest.fixture(scope="module")
def bundled():
    return load_model(BUNDLED, progress=False), load_tokenizer(BUNDLED)


def test_bundled_files_are_small_and_mixtral_shaped(bundled):
    model, tokenizer = bundled
    size = sum(p.stat().st_size for p in BUNDLED.iterdir())
    assert size <= 15e6, f"bundled folder is {size / 1e6:.1f} MB"
    c = model.config
    assert (c.num_experts, c.num_experts_per_tok) == (8, 2)
    assert c.num_key_value_heads < c.num_attention_heads  # grouped-query attention
    assert tokenizer.vocab_size == c.vocab_size
    assert 1e6 < count_parameters(model).total < 20e6


def test_heldout_loss_matches_the_card(bundled):
    model, tokenizer = bundled
    card = (BUNDLED / "README.md").read_text(encoding="utf-8")
    stated = float(re.search(r"Held-out loss of the shipped.*?: ([0-9.]+)\s+nats/token", card, re.S).group(1))
    loss, n_tokens = heldout_loss(model, tokenizer, (BUNDLED / "heldout.txt").read_text(encoding="utf-8"))
    assert n_tokens == 16_384
    assert loss <= stated + 0.02
    assert loss < 4.5  # far below a uniform guess over 2,048 tokens (7.62 nats)


def test_generate_without_model_uses_bundled(capsys):
    torch.manual_seed(0)
    rc = main(
        ["generate", "--prompt", "ROMEO:", "--echo", "--max-new-tokens", "40", "--temperature", "0.8", "--seed", "0"]
    )
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert captured.out.startswith("ROMEO:")  # --echo prints the prompt first
    assert len(captured.out.split()) >= 10 and "decode" in captured.err
