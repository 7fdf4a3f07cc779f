"""Held-out loss of a language model on a text: mean next-token cross-entropy over fixed windows.

Used for the bundled model's card and the test that checks the shipped weights still reach it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..generation.tokenizer import Tokenizer
from ..model.mixtral import Mixtral


@torch.no_grad()
def heldout_loss(
    model: Mixtral, tokenizer: Tokenizer, text: str, *, seq_len: int = 256, max_windows: int = 64, batch_size: int = 8
) -> tuple[float, int]:
    """Mean cross-entropy (nats/token) over consecutive ``seq_len`` windows of ``text``.

    Each window is fed after a BOS token (as generation does), and predicts its own tokens.
    Returns (loss, number of tokens scored).
    """
    ids = torch.tensor(tokenizer.encode(text, bos=False), dtype=torch.long)
    n = min(max_windows, len(ids) // seq_len)
    if n == 0:
        raise ValueError(f"text: {len(ids)} tokens, fewer than one window of {seq_len}")
    targets = ids[: n * seq_len].view(n, seq_len)  # [W, T]
    inputs = torch.cat([torch.full((n, 1), tokenizer.bos_id), targets[:, :-1]], dim=1)
    total = 0.0
    for i in range(0, n, batch_size):
        logits = model(inputs[i : i + batch_size].to(model.device)).float()
        y = targets[i : i + batch_size].to(logits.device)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum").item()
    return total / (n * seq_len), n * seq_len
