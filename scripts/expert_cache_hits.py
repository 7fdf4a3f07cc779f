"""Expert-cache hit rates on real text: how often an LRU of 2, 4 or 6 of 8 experts per layer
already holds what the next token needs, and the routing's own locality.

Runs a model over a text in 256-token windows (teacher-forced: the routing decoding would see),
records every layer's top-k choice per token, and replays each layer's choices through the LRU
that offloaded layers use (``offload.cache.ExpertLRU``). Bytes moved per token are misses times
one expert's bytes: this model's (bfloat16), and Mixtral-8x7B's int8 expert (176 MB) for scale.
A model of the same shape with random weights is the contrast (no learned locality).

    python scripts/expert_cache_hits.py                       # bundled model, tinyshakespeare + heldout
    python scripts/expert_cache_hits.py --tokens 8192 --text FILE
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mixtral_lite import Mixtral, load_model, load_tokenizer  # noqa: E402
from mixtral_lite.commands.generate import BUNDLED  # noqa: E402
from mixtral_lite.offload.cache import replay, reuse_rate  # noqa: E402

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
WINDOW = 256
SIZES = (2, 4, 6)
EXPERT_8X7B_INT8 = 176_160_768 + 2 * (2 * 14336 + 4096)  # bytes of one int8 expert with its scales


@torch.no_grad()
def routing(model: Mixtral, ids: list[int]) -> list[list[list[int]]]:
    """Per MoE layer, per token: the chosen experts (top-k of the router logits)."""
    k = model.config.num_experts_per_tok
    layers: list[list[list[int]]] | None = None
    for start in range(0, len(ids) - 1, WINDOW):
        window = torch.tensor([ids[start : start + WINDOW]])
        out = model(window, return_router_logits=True)
        chosen = [r.topk(k, dim=-1).indices.tolist() for r in out.router_logits]
        layers = chosen if layers is None else [a + b for a, b in zip(layers, chosen, strict=True)]
    return layers or []


def hit_rate(layers: list[list[list[int]]], size: int) -> tuple[float, int]:
    stats = [replay(steps, size) for steps in layers]
    hits, misses = sum(s.hits for s in stats), sum(s.misses for s in stats)
    return hits / (hits + misses), misses


def table_rows(name: str, text: str, layers: list[list[list[int]]], expert_bytes: int) -> list[str]:
    """One row per LRU size; the shuffled columns replay the same tokens in a random order: what
    the experts' uneven load alone gives, without the text's order."""
    rows = []
    tokens = len(layers[0])
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(tokens, generator=g).tolist()
    shuffled = [[steps[i] for i in order] for steps in layers]
    locality = sum(reuse_rate(steps) for steps in layers) / len(layers)
    locality_shuffled = sum(reuse_rate(steps) for steps in shuffled) / len(layers)
    for size in SIZES:
        rate, misses = hit_rate(layers, size)
        rate_shuffled, _ = hit_rate(shuffled, size)
        per_token = misses / tokens  # experts loaded per token, all layers
        rows.append(
            f"| {name} | {text} | {size}/8 | {rate:.1%} ({rate_shuffled:.1%}) | {per_token:.2f} | "
            f"{per_token * expert_bytes / 1e6:.2f} MB | {per_token * EXPERT_8X7B_INT8 / 1e9:.2f} GB | "
            f"{locality:.1%} ({locality_shuffled:.1%}) |"
        )
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=16384)
    p.add_argument("--text", type=Path, action="append", help="text files (default: tinyshakespeare, heldout)")
    args = p.parse_args()
    torch.set_num_threads(1)
    texts = args.text or [SHAKESPEARE, BUNDLED / "heldout.txt"]
    tok = load_tokenizer(BUNDLED)
    trained = load_model(BUNDLED, dtype=torch.float32, progress=False)
    random = Mixtral(trained.config).eval()
    random.reset_parameters(generator=torch.Generator().manual_seed(0))
    c = trained.config
    expert_bytes = 3 * c.hidden_size * c.intermediate_size * 2  # bfloat16, as shipped
    shape = f"{c.num_hidden_layers} layers, {c.num_experts} experts, top-{c.num_experts_per_tok}"
    print(f"{shape}; {args.tokens} tokens per text")
    print()
    print(
        "| model | text | LRU size | hit rate (shuffled) | experts loaded / token | bytes / token (this model) "
        "| bytes / token (8x7B int8 experts) | reuse by the next token (shuffled) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for path in texts:
        ids = tok.encode(path.read_text(encoding="utf-8"), bos=True)[: args.tokens]
        for name, model in (("bundled (Shakespeare-trained)", trained), ("same shape, random weights", random)):
            for row in table_rows(name, path.name, routing(model, ids), expert_bytes):
                print(row)


if __name__ == "__main__":
    main()
