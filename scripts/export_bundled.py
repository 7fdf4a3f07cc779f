"""Package a training run as the bundled model: bfloat16 weights, tokenizer, held-out text, card.

Usage: python scripts/export_bundled.py RUN_DIR DATA_FILE [--out mixtral_lite/bundled]
(after scripts/train_tiny.sh; the card records the run's command, steps, time and losses).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from mixtral_lite import count_parameters, generate, load_model, load_tokenizer, save_pretrained
from mixtral_lite.training.heldout import heldout_loss

PROMPT = "ROMEO:"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("data", type=Path)
    ap.add_argument("--out", type=Path, default=Path("mixtral_lite/bundled"))
    ap.add_argument("--train-time", default="", help="wall time of the training run, for the card")
    args = ap.parse_args()
    torch.set_num_threads(1)

    log = json.loads((args.run / "train_log.json").read_text())
    val_fraction = log["train_config"].get("val_fraction", 0.1)
    if args.out.exists():
        shutil.rmtree(args.out)
    model = load_model(args.run, dtype=torch.bfloat16, progress=False)
    save_pretrained(model, args.out)
    shutil.copy(args.run / "tokenizer.model", args.out / "tokenizer.model")

    # The held-out text: the validation split (the last val_fraction of the tokens) as text.
    tokenizer = load_tokenizer(args.out)
    ids = tokenizer.encode(args.data.read_text(encoding="utf-8"), bos=False)
    heldout = tokenizer.decode(ids[len(ids) - int(len(ids) * val_fraction) :])
    heldout = heldout[heldout.index("\n\n") + 2 :]  # start at a speaker's turn
    (args.out / "heldout.txt").write_text(heldout, encoding="utf-8")

    shipped = load_model(args.out, dtype=torch.float32, progress=False)
    loss, n_tokens = heldout_loss(shipped, tokenizer, heldout)
    sample = generate(shipped, tokenizer, PROMPT, max_new_tokens=120, temperature=0.8, top_k=40, seed=0).text
    counts = count_parameters(shipped)
    cfg = log["train_config"]
    card = CARD.format(
        total=counts.total,
        active=counts.active,
        steps=log["step"],
        tokens=log["step"] * cfg["batch_size"] * cfg["seq_len"],
        passes=log["step"] * cfg["batch_size"] * cfg["seq_len"] / (len(ids) * (1 - val_fraction)),
        train_time=args.train_time or "see train_log",
        val=log["val"][-1]["val_loss"] if isinstance(log["val"], list) else log["val"],
        heldout=loss,
        n_tokens=n_tokens,
        prompt=PROMPT,
        sample=(PROMPT + sample).rstrip(),
        size=(args.out / "model.safetensors").stat().st_size / 1e6,
    )
    (args.out / "README.md").write_text(card, encoding="utf-8")
    print(card)


CARD = """# Bundled model: a tiny Mixtral trained on Shakespeare

A Mixtral-architecture model (8 experts, top-2 routing, grouped-query attention 6/2 heads, RoPE,
4 layers, hidden 192, expert size 256) with its own 2,048-token SentencePiece BPE tokenizer
(byte fallback), trained from scratch with `mixtral-lite train` on tinyshakespeare (1.1 MB).
{total:,} parameters, {active:,} active per token; bfloat16 weights, {size:.1f} MB.
It is the model `make run` and `mixtral-lite generate` (without `--model`) use.

## Training
    scripts/train_tiny.sh ../shared/data/tinyshakespeare.txt runs/shakespeare-tiny
    python scripts/export_bundled.py runs/shakespeare-tiny ../shared/data/tinyshakespeare.txt

{steps} AdamW steps of 8 x 256 tokens ({tokens:,} tokens, {passes:.1f} passes over the training
split), peak lr 2e-3 with 50 warmup steps and cosine decay to 2e-4, Switch load-balancing loss
0.02, gradient clipping 1.0, seed 0, one CPU thread; training took {train_time} on a shared
2-core machine.

## Quality
- Validation loss at the end of training (float32, 16 batches of 8 x 256 tokens of the held-out
  last 10% of the text): {val:.4f} nats/token.
- Held-out loss of the shipped bfloat16 weights on `heldout.txt` (the same held-out split, first
  {n_tokens:,} tokens in 256-token windows, `mixtral_lite.heldout.heldout_loss`): {heldout:.4f}
  nats/token. `tests/test_bundled.py` checks the shipped model stays below this (+0.02).

## Sample
`mixtral-lite generate --prompt "{prompt}" --max-new-tokens 120 --temperature 0.8 --top-k 40 --seed 0`

```
{sample}
```

It writes Shakespeare-shaped text (speaker names, verse lines, mostly real words) without
meaning: a demo of the architecture and the tooling, not a useful language model.
"""

if __name__ == "__main__":
    main()
