"""A preallocated key/value cache, created by generation and passed into ``Mixtral.forward``.

Shapes are static (``[B, KV, S, hd]`` per layer) so a decode step can be compiled. Under
multi-head latent attention (DeepSeek) ``k`` holds the latent ``[B, 1, S, kv_lora_rank]`` and ``v``
the shared rotary key ``[B, 1, S, rope dims]``: that is all MLA needs, no per-head keys or values.
Each slot also
records whether it holds a real token (``valid``: left padding writes invalid slots) and the
token's rotary position (``pos``: used for the sliding-window mask).

Axis legend: B batch, KV key/value heads, S cache slots, T new tokens, hd head dim.
"""

from __future__ import annotations

import torch

from ..config import MixtralConfig


class KVCache:
    def __init__(
        self,
        config: MixtralConfig,
        batch_size: int,
        max_seq_len: int,
        *,
        device: torch.device | str | list[torch.device] = "cpu",
        dtype: torch.dtype = torch.float32,
        num_kv_heads: int | None = None,
    ) -> None:
        """``device`` may be a list with one device per layer (layers split across devices)."""
        n_layers = config.num_hidden_layers
        devices = device if isinstance(device, list) else [torch.device(device)] * n_layers
        if len(devices) != n_layers:
            raise ValueError(f"device: expected one device per layer ({n_layers}), got {len(devices)}")
        if config.attention.latent:
            k_shape = (batch_size, 1, max_seq_len, config.attention.kv_lora_rank)
            v_shape = (batch_size, 1, max_seq_len, config.head_dim)
        else:
            kv = num_kv_heads or config.num_key_value_heads
            k_shape = v_shape = (batch_size, kv, max_seq_len, config.head_dim)
        self.k = [torch.zeros(k_shape, dtype=dtype, device=d) for d in devices]
        self.v = [torch.zeros(v_shape, dtype=dtype, device=d) for d in devices]
        self.valid = torch.zeros(batch_size, max_seq_len, dtype=torch.bool, device=devices[0])
        self.pos = torch.zeros(batch_size, max_seq_len, dtype=torch.long, device=devices[0])
        self.batch_size = batch_size
        self.max_seq_len = max_seq_len

    @property
    def bytes_per_token(self) -> int:
        """Bytes one token's keys and values take, over all layers (one batch row)."""
        return sum(t[0, :, 0].numel() * t.element_size() for t in (*self.k, *self.v))

    def record(self, slots: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Mark ``slots`` [T] as holding tokens at ``positions`` [B, T] (``valid`` [B, T])."""
        self.pos.index_copy_(1, slots, positions)
        self.valid.index_copy_(1, slots, valid)

    def update(
        self, layer: int, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``k``, ``v`` [B, KV, T, hd] at ``slots`` [T]; return the whole cache [B, KV, S, hd]."""
        self.k[layer].index_copy_(2, slots, k)
        self.v[layer].index_copy_(2, slots, v)
        return self.k[layer], self.v[layer]

    def reset(self) -> None:
        self.valid.zero_()
        self.pos.zero_()


def kv_bytes_per_token(config: MixtralConfig, dtype: torch.dtype) -> int:
    """Cache bytes per token over all layers: 2 * KV * hd per layer, or kv_lora_rank + rope dims
    under latent attention (what ``KVCache.bytes_per_token`` measures)."""
    a = config.attention
    per_layer = a.kv_lora_rank + config.head_dim if a.latent else 2 * config.num_key_value_heads * config.head_dim
    return config.num_hidden_layers * per_layer * dtype.itemsize
